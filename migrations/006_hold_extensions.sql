-- Hold extensions (POST /v1/reservations/{rid}/extend): how often and how long in all a sale lets
-- one hold be extended. Kept so that `flashsale recover` loads a sale again with its limits.
ALTER TABLE sales
    ADD COLUMN max_extensions integer NOT NULL DEFAULT 2,
    ADD COLUMN max_extension_seconds integer NOT NULL DEFAULT 300;
