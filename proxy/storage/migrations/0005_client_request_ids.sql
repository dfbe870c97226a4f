-- docs/design.md#client-request-ids: an x-request-id a client sent, reserved before its request is forwarded, so
-- an id keys one ledger row only: a second request with it is refused (409), never committed as a duplicate and so
-- never answered unbilled. Kept as long as the ledger rows they key.
CREATE TABLE client_request_ids (
    request_id   text        PRIMARY KEY,
    principal_id text        NOT NULL,
    reserved_at  timestamptz NOT NULL DEFAULT now()
);
