-- docs/design.md#engine-cache-salt: secrets every proxy of a database shares, created on first use by the first
-- proxy that needs one (the cache-salt key: the same tenant gets the same salt from every replica).
CREATE TABLE proxy_secrets (
    name       text        PRIMARY KEY,
    value      bytea       NOT NULL CHECK (octet_length(value) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
