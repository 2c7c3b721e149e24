-- What `flashsale recover` needs of a reservation besides its status, so that Redis gets it back
-- whole: the end user's address key and device it was made for (client budgets; NULL: none was
-- given), and how often and how long its hold was extended (the sale's limits bound the total).
ALTER TABLE reservations
    ADD COLUMN client_ip text,
    ADD COLUMN client_device text,
    ADD COLUMN extensions integer NOT NULL DEFAULT 0,
    ADD COLUMN extended_s integer NOT NULL DEFAULT 0;
