-- A sale's waiting room settings (the sale document's "waiting_room"), so that flashsale recover
-- loads a sale lost in Redis with its room: its line itself lives in Redis only.
ALTER TABLE sales ADD COLUMN waiting_room jsonb;
