-- docs/design.md#openais-caching-parameters: OpenAI's prompt_cache_key, the client's routing hint, as sent.
-- NULL: the request sent none (or its API has no such field).
ALTER TABLE request_log ADD COLUMN prompt_cache_key text;
