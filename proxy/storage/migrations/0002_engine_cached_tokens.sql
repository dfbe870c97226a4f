-- docs/design.md#engine-verified-cache-reads: the upstream's own count of prompt tokens it served from its KV cache
-- (usage.prompt_tokens_details.cached_tokens, llama-server's timings.cache_n, or an Anthropic-style upstream's
-- cache_read_input_tokens), beside the read tokens we bill. NULL: the upstream did not say.
ALTER TABLE ledger ADD COLUMN engine_cached_tokens integer CHECK (engine_cached_tokens >= 0);
ALTER TABLE request_log ADD COLUMN engine_cached_tokens integer CHECK (engine_cached_tokens >= 0);
