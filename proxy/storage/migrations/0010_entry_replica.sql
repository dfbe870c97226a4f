-- docs/design.md#replica-routing: the upstream replica that last computed an entry's prefix, so the next request
-- that reads it can be sent where the engine still holds its KV cache. A hint for routing, never for billing.
ALTER TABLE cache_entries ADD COLUMN replica text;
