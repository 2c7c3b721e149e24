-- Sales, their items, and one row per reservation with the time of each change.
CREATE TABLE sales (
    id            text PRIMARY KEY,
    name          text NOT NULL,
    starts_at     timestamptz NOT NULL,
    ends_at       timestamptz NOT NULL,
    hold_seconds  integer NOT NULL CHECK (hold_seconds > 0),
    state         text NOT NULL CHECK (state IN ('active', 'paused', 'ended')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- time of the Redis event this row reflects; an older event never overwrites a newer one
    changed_at    timestamptz NOT NULL,
    CHECK (ends_at > starts_at)
);

CREATE TABLE items (
    sale_id         text NOT NULL REFERENCES sales (id) ON DELETE CASCADE,
    sku             text NOT NULL,
    name            text NOT NULL,
    price_cents     bigint NOT NULL CHECK (price_cents >= 0),
    stock_total     bigint NOT NULL CHECK (stock_total >= 0),
    per_user_limit  integer NOT NULL CHECK (per_user_limit >= 1),
    PRIMARY KEY (sale_id, sku)
);

-- No foreign key to sales: events of one sale may be written in any order by several workers.
CREATE TABLE reservations (
    id               text PRIMARY KEY,
    sale_id          text NOT NULL,
    sku              text NOT NULL,
    user_id          text NOT NULL,
    quantity         integer NOT NULL CHECK (quantity > 0),
    status           text NOT NULL CHECK (status IN ('held', 'confirmed', 'released', 'expired')),
    idempotency_key  text,
    payment_ref      text,
    created_at       timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    confirmed_at     timestamptz,
    released_at      timestamptz,
    expired_at       timestamptz,
    persisted_at     timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'confirmed') = (confirmed_at IS NOT NULL)),
    CHECK ((status = 'released') = (released_at IS NOT NULL)),
    CHECK ((status = 'expired') = (expired_at IS NOT NULL))
);

-- One reservation per (sale, user, idempotency key): a retried request can never make two rows.
CREATE UNIQUE INDEX reservations_idempotency
    ON reservations (sale_id, user_id, idempotency_key) WHERE idempotency_key <> '';

CREATE INDEX reservations_sale_sku_status ON reservations (sale_id, sku, status);
