"""What one finished request commits: its bill (ledger row), its cache changes and its log row.

All three land in one statement, so in one round trip and one implicit transaction, and the
request id makes it idempotent: a commit retried after a lost connection, or replayed from the
proxy's queue, finds its ledger row and changes nothing, so a request is never billed twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import cached_property

from promptcache.proxy.domain.classify import ChainBlock, Classification
from promptcache.proxy.domain.entries import Scope
from promptcache.proxy.domain.pricing import Split, Tariff, cost, list_cost
from promptcache.proxy.domain.tiers import TIERS
from promptcache.proxy.storage import requestlog
from promptcache.proxy.storage.postgres import Database

CHAIN_HASH_BYTES = 16
"""The request log keeps the first 16 bytes of each prefix hash: enough to replay, nothing to read."""


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    started_at: datetime
    scope: Scope
    api: str
    status: int
    split: Split
    tariff: Tariff
    chain: Sequence[ChainBlock]
    classification: Classification | None
    """Cache changes to apply; None when the request must not touch the index."""
    latency_ms: float = 0.0
    sent_tiers: Sequence[str | None] | None = None
    """The markers as the client sent them, per chain block, for the request log (default: the chain's)."""
    engine_cached_tokens: int | None = None
    """The upstream's own count of prompt tokens served from its KV cache; None when it did not report one."""

    @property
    def billable(self) -> bool:
        """Only a 2xx response with usage is billed and may write to the index."""
        return 200 <= self.status < 300

    @cached_property
    def cost(self) -> Decimal:
        return cost(self.split, self.tariff)

    @cached_property
    def list_cost(self) -> Decimal:
        return list_cost(self.split, self.tariff)


_LOGGED = (*requestlog.COLUMNS, "latency_ms")
"""The request_log columns a commit fills: the exported format's, and the latency the format leaves out."""

_PARAMETERS = (
    *_LOGGED,
    "tariff_version", "write_multiplier_5m", "write_multiplier_1h", "write_multiplier_24h", "read_multiplier",
    "uncached_tokens", "cost", "billable",
    "write_hashes", "write_tokens", "write_tiers", "write_expiries",
    "read_hash", "read_expires_at",
)  # fmt: skip
"""The commit's parameters in ``$n`` order; log parameters are named for their columns."""

_PLACEHOLDERS = {name: f"${n}" for n, name in enumerate(_PARAMETERS, 1)}

# The log row always; the ledger row when billable; the cache changes only when this statement is
# the one that billed (a retried commit finds its ledger row and changes nothing). The upsert is
# memory.merge_write in SQL: an expired entry starts a new episode ({ts} is "now"); a live one keeps
# its created_at and only moves to a later expiry. Sorted so concurrent commits lock rows in one order.
_COMMIT = """
WITH log AS (
    INSERT INTO request_log ({log_columns}) VALUES ({log_values})
    ON CONFLICT (request_id) DO NOTHING
    RETURNING 1
), bill AS (
    INSERT INTO ledger (
        request_id, principal_id, virtual_model, tokenizer_version, tariff_version,
        prompt_tokens, completion_tokens, read_tokens, creation_5m, creation_1h, creation_24h,
        uncached_tokens, cost, list_cost, started_at, engine_cached_tokens
    )
    SELECT {request_id}, {principal_id}, {virtual_model}, {tokenizer_version}, COALESCE({tariff_version}::bigint, (
            SELECT t.version FROM tariffs t
            WHERE t.model = {virtual_model} AND t.valid_from <= {ts} AND (t.valid_until IS NULL OR {ts} < t.valid_until)
                AND t.input_per_mtok = {input_per_mtok} AND t.output_per_mtok = {output_per_mtok}
                AND t.write_multiplier_5m = {write_multiplier_5m}::numeric
                AND t.write_multiplier_1h = {write_multiplier_1h}::numeric
                AND t.write_multiplier_24h = {write_multiplier_24h}::numeric
                AND t.read_multiplier = {read_multiplier}::numeric
            ORDER BY t.version DESC LIMIT 1)),
        {prompt_tokens}, {completion_tokens}, {read_tokens}, {creation_5m}, {creation_1h}, {creation_24h},
        {uncached_tokens}::integer, {cost}::numeric, {list_cost}, {ts}, {engine_cached_tokens}::integer
    WHERE {billable}::boolean
    ON CONFLICT (request_id) DO NOTHING
    RETURNING 1
), writes AS (
    INSERT INTO cache_entries AS e (
        principal_id, virtual_model, tokenizer_version, prefix_hash, cum_tokens, tier, created_at, expires_at
    )
    SELECT {principal_id}, {virtual_model}, {tokenizer_version}, w.prefix_hash, w.cum_tokens, w.tier, {ts},
        w.expires_at
    FROM unnest({write_hashes}::bytea[], {write_tokens}::integer[], {write_tiers}::text[],
                {write_expiries}::timestamptz[])
        AS w(prefix_hash, cum_tokens, tier, expires_at)
    WHERE EXISTS (SELECT 1 FROM bill)
    ORDER BY w.prefix_hash
    ON CONFLICT (principal_id, virtual_model, tokenizer_version, prefix_hash) DO UPDATE SET
        cum_tokens = EXCLUDED.cum_tokens,
        tier = EXCLUDED.tier,
        expires_at = EXCLUDED.expires_at,
        created_at = CASE WHEN e.expires_at > {ts} THEN e.created_at ELSE EXCLUDED.created_at END
    WHERE e.expires_at <= {ts} OR EXCLUDED.expires_at > e.expires_at
    RETURNING 1
), refresh AS (
    UPDATE cache_entries SET expires_at = GREATEST(expires_at, {read_expires_at}::timestamptz)
    WHERE {read_hash}::bytea IS NOT NULL AND EXISTS (SELECT 1 FROM bill)
        AND principal_id = {principal_id} AND virtual_model = {virtual_model}
        AND tokenizer_version = {tokenizer_version} AND prefix_hash = {read_hash}
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM log) AS logged, EXISTS (SELECT 1 FROM bill) AS billed
""".format_map({
    "log_columns": ", ".join(_LOGGED),
    "log_values": ", ".join(_PLACEHOLDERS[column] for column in _LOGGED),
    **_PLACEHOLDERS,
})


class Ledger:
    """The commit path, over a shared :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def commit(self, record: RequestRecord, *, refresh_read: bool = True) -> bool:
        """Log, bill and apply one finished request in a single transaction; False when already done.

        The ledger row's request id is the idempotency key: when it already exists this is a
        retry, and nothing else is touched, so a request is never billed or written twice.
        A non-billable request only gets its log row. ``refresh_read=False`` leaves the read's
        expiry to a write-behind ``PrefixIndex.refresh_many`` (Redis debounces refreshes of hot prefixes).
        """
        args = _commit_args(record, refresh_read)
        row = await self._db.run(lambda conn: conn.fetchrow(_COMMIT, *args), commit=True)
        assert row is not None
        return bool(row["billed"] if record.billable else row["logged"])


def _commit_args(record: RequestRecord, refresh_read: bool) -> list[object]:
    """The commit's arguments in :data:`_PARAMETERS` order."""
    values = _commit_values(record, refresh_read)
    assert values.keys() == _PLACEHOLDERS.keys(), set(values) ^ set(_PLACEHOLDERS)
    return [values[name] for name in _PARAMETERS]


def _commit_values(record: RequestRecord, refresh_read: bool) -> dict[str, object]:
    split, chain, tariff = record.split, record.chain, record.tariff
    result = record.classification if record.billable and split.cache_valid else None
    writes = result.writes if result is not None else ()
    read = result.read if result is not None and refresh_read else None
    return {
        "request_id": record.request_id,
        "ts": record.started_at,
        "principal_id": record.scope.principal_id,
        "virtual_model": record.scope.virtual_model,
        "tokenizer_version": record.scope.tokenizer_version,
        "api": record.api,
        "status": record.status,
        "prompt_tokens": split.prompt,
        "completion_tokens": split.completion,
        "read_tokens": split.read,
        **{f"creation_{tier}": split.creation.get(tier, 0) for tier in TIERS},
        "input_per_mtok": tariff.input_per_mtok,
        "output_per_mtok": tariff.output_per_mtok,
        "billed_cost": record.cost if record.billable else Decimal(0),  # a failed request is logged, not billed
        "list_cost": record.list_cost,
        "latency_ms": record.latency_ms,
        "chain_hashes": [b.hash[:CHAIN_HASH_BYTES] for b in chain],
        "chain_tokens": [b.tokens for b in chain],
        "chain_roles": [b.role for b in chain],
        "chain_tiers": list(record.sent_tiers) if record.sent_tiers is not None else [b.tier for b in chain],
        "engine_cached_tokens": record.engine_cached_tokens,
        "tariff_version": tariff.version or None,  # version 0: prices not (yet) stored as a tariff
        **{f"write_multiplier_{tier}": tariff.write_multipliers[tier] for tier in TIERS},
        "read_multiplier": tariff.read_multiplier,
        "uncached_tokens": split.uncached,
        "cost": record.cost,
        "billable": record.billable,
        "write_hashes": [w.hash for w in writes],
        "write_tokens": [w.tokens for w in writes],
        "write_tiers": [w.tier for w in writes],
        "write_expiries": [w.expires_at for w in writes],
        "read_hash": read.hash if read is not None else None,
        "read_expires_at": read.expires_at if read is not None else None,
    }
