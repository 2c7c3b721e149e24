-- The end user's address key and device a reservation was made for (client budgets), so that
-- `flashsale recover` can count them again after Redis lost them. NULL: none was given.
ALTER TABLE reservations
    ADD COLUMN client_ip text,
    ADD COLUMN client_device text;
