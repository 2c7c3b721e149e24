-- Webhooks: the endpoints ops registered, and every delivery owed to them (an outbox: the
-- dispatcher writes a row per event and endpoint from the event streams, then sends it until it
-- is answered 2xx, or dead-letters it once its retries are spent).
CREATE TABLE webhooks (
    id text PRIMARY KEY,
    url text NOT NULL,
    events text[] NOT NULL,
    secret text NOT NULL,               -- whsec_<base64>: signs every delivery
    previous_secret text,               -- the one before a rotation, also signing until previous_until
    previous_until timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
    webhook_id text NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id text NOT NULL,             -- the webhook-id header: the same on every retry
    sale_id text NOT NULL,
    type text NOT NULL,
    payload text NOT NULL,              -- the body sent, byte for byte (it is what is signed)
    occurred_at timestamptz NOT NULL,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts integer NOT NULL DEFAULT 0,
    next_at timestamptz NOT NULL DEFAULT now(),  -- when it is due (or, being sent, when its lease ends)
    last_error text,
    delivered_at timestamptz,
    PRIMARY KEY (webhook_id, event_id)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (webhook_id, next_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_newest ON webhook_deliveries (webhook_id, occurred_at DESC);
CREATE INDEX webhook_deliveries_delivered ON webhook_deliveries (delivered_at) WHERE status = 'delivered';
CREATE INDEX webhook_deliveries_undelivered ON webhook_deliveries (sale_id, status) WHERE status <> 'delivered';
