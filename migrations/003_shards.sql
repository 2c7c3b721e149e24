-- A sharded item (items[].shards) and the hash tags of the sale's extra slots, chosen when the
-- sale was created: flashsale recover loads them again, so that every reservation id (which
-- names its slot) finds its keys, and the shards stay on the masters they were put on.
ALTER TABLE items ADD COLUMN shards integer NOT NULL DEFAULT 1 CHECK (shards BETWEEN 1 AND 64);
ALTER TABLE sales ADD COLUMN slots text[] NOT NULL DEFAULT '{}';
