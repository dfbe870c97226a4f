-- docs/design.md#storage storage: the prefix index, tariffs, API keys, the ledger and the request log.
-- Money is NUMERIC (never float); schema_migrations is created by the runner itself.

CREATE TABLE cache_entries (
    principal_id      text        NOT NULL,
    virtual_model     text        NOT NULL,
    tokenizer_version text        NOT NULL,
    prefix_hash       bytea       NOT NULL,
    cum_tokens        integer     NOT NULL CHECK (cum_tokens >= 0),
    tier              text        NOT NULL CHECK (tier IN ('5m', '1h', '24h')),
    created_at        timestamptz NOT NULL,
    expires_at        timestamptz NOT NULL,
    PRIMARY KEY (principal_id, virtual_model, tokenizer_version, prefix_hash)
);
CREATE INDEX cache_entries_expires_at ON cache_entries (expires_at);

-- Append-only: a price change closes the active row and opens a new one. Multipliers are
-- NOT NULL (docs/design.md#billing bounds them to [0, 100)): a version that cannot price a request is no tariff.
CREATE TABLE tariffs (
    version              bigserial   PRIMARY KEY,
    model                text        NOT NULL,
    input_per_mtok       numeric     NOT NULL CHECK (input_per_mtok >= 0),
    output_per_mtok      numeric     NOT NULL CHECK (output_per_mtok >= 0),
    write_multiplier_5m  numeric     NOT NULL CHECK (write_multiplier_5m >= 0 AND write_multiplier_5m < 100),
    write_multiplier_1h  numeric     NOT NULL CHECK (write_multiplier_1h >= 0 AND write_multiplier_1h < 100),
    write_multiplier_24h numeric     NOT NULL CHECK (write_multiplier_24h >= 0 AND write_multiplier_24h < 100),
    read_multiplier      numeric     NOT NULL CHECK (read_multiplier >= 0 AND read_multiplier < 100),
    valid_from           timestamptz NOT NULL,
    valid_until          timestamptz CHECK (valid_until >= valid_from)
);
CREATE UNIQUE INDEX tariffs_one_active ON tariffs (model) WHERE valid_until IS NULL;

-- Only the SHA-256 of a key is stored; key_id is its first 12 hex characters, safe to show.
CREATE TABLE api_keys (
    key_id       text        PRIMARY KEY,
    key_hash     bytea       NOT NULL UNIQUE,
    principal_id text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);

-- One row per billed request; the primary key makes a retried commit bill nothing.
-- tariff_version is NULL when the request was billed at prices not (yet) stored as a tariff.
CREATE TABLE ledger (
    request_id        text        PRIMARY KEY,
    principal_id      text        NOT NULL,
    virtual_model     text        NOT NULL,
    tokenizer_version text        NOT NULL,
    tariff_version    bigint      REFERENCES tariffs (version),
    prompt_tokens     integer     NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens integer     NOT NULL CHECK (completion_tokens >= 0),
    read_tokens       integer     NOT NULL CHECK (read_tokens >= 0),
    creation_5m       integer     NOT NULL CHECK (creation_5m >= 0),
    creation_1h       integer     NOT NULL CHECK (creation_1h >= 0),
    creation_24h      integer     NOT NULL CHECK (creation_24h >= 0),
    uncached_tokens   integer     NOT NULL CHECK (uncached_tokens >= 0),
    cost              numeric     NOT NULL,
    list_cost         numeric     NOT NULL,
    started_at        timestamptz NOT NULL,
    committed_at      timestamptz NOT NULL DEFAULT now()
);

-- docs/design.md#replay: what replay needs and nothing more; chain_hashes hold the first 16 bytes of each
-- block's prefix hash, chain_tiers a NULL element for a block without a marker.
CREATE TABLE request_log (
    request_id        text             PRIMARY KEY,
    ts                timestamptz      NOT NULL,
    principal_id      text             NOT NULL,
    virtual_model     text             NOT NULL,
    tokenizer_version text             NOT NULL,
    api               text             NOT NULL,
    status            integer          NOT NULL,
    prompt_tokens     integer          NOT NULL,
    completion_tokens integer          NOT NULL,
    read_tokens       integer          NOT NULL,
    creation_5m       integer          NOT NULL,
    creation_1h       integer          NOT NULL,
    creation_24h      integer          NOT NULL,
    input_per_mtok    numeric          NOT NULL,
    output_per_mtok   numeric          NOT NULL,
    billed_cost       numeric          NOT NULL,
    list_cost         numeric          NOT NULL,
    latency_ms        double precision NOT NULL,
    chain_hashes      bytea[]          NOT NULL,
    chain_tokens      integer[]        NOT NULL,
    chain_roles       text[]           NOT NULL,
    chain_tiers       text[]           NOT NULL
);
CREATE INDEX request_log_ts ON request_log (ts);
