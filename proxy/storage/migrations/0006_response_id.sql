-- docs/design.md#cache-miss-diagnostics: the upstream's id of the answer (chatcmpl-…, msg_…, resp_…), the name a
-- client knows a previous request by; found per principal, so the index leads with it.
ALTER TABLE request_log ADD COLUMN response_id text;
CREATE INDEX request_log_response_id ON request_log (principal_id, response_id) WHERE response_id IS NOT NULL;
