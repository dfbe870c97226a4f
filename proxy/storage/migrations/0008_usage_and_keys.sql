-- docs/design.md#usage-reports: reports read the ledger by when its requests started, and one tenant's rows.
CREATE INDEX ledger_started_at ON ledger (started_at);
CREATE INDEX ledger_principal_started_at ON ledger (principal_id, started_at);
-- docs/design.md#api-keys: when a proxy last looked a key up (so to the key cache's period), and keys listed by
-- principal. A revocation may lie in the future: a rotated key works until its grace period ends.
ALTER TABLE api_keys ADD COLUMN last_used_at timestamptz;
CREATE INDEX api_keys_principal ON api_keys (principal_id);
