"""What one finished request commits: its bill (ledger row), its cache changes and its log row.

All three land in one statement, and the request id makes it idempotent: a commit retried after
a lost connection, or replayed from the proxy's spool, finds its ledger row and changes nothing,
so a request is never billed twice. A request becomes a :class:`CommitRow` (the statement's
parameters, plain data the spool can keep on disk), and many rows go in one round trip and one
transaction (a group commit: asyncpg pipelines the statement once per row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import cached_property

import msgspec

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
    prompt_cache_key: str | None = None
    response_id: str | None = None
    """The upstream's id of its answer (``chatcmpl-…``, ``msg_…``, ``resp_…``): what cache-miss diagnostics find a
    previous request by."""
    replica: str | None = None
    """The upstream replica that answered: the entries this request read or wrote remember it."""

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


class CommitRow(msgspec.Struct, frozen=True, kw_only=True):
    """One request's commit parameters, named ``$n`` in field order. Log fields are named for their columns."""

    request_id: str
    ts: datetime
    principal_id: str
    virtual_model: str
    tokenizer_version: str
    api: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    read_tokens: int
    creation_5m: int
    creation_1h: int
    creation_24h: int
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    billed_cost: Decimal
    list_cost: Decimal
    chain_hashes: list[bytes]
    chain_tokens: list[int]
    chain_roles: list[str]
    chain_tiers: list[str | None]
    engine_cached_tokens: int | None
    latency_ms: float
    tariff_version: int | None
    write_multiplier_5m: Decimal
    write_multiplier_1h: Decimal
    write_multiplier_24h: Decimal
    read_multiplier: Decimal
    uncached_tokens: int
    cost: Decimal
    billable: bool
    write_hashes: list[bytes]
    write_tokens: list[int]
    write_tiers: list[str]
    write_expiries: list[datetime]
    read_hash: bytes | None
    read_expires_at: datetime | None
    prompt_cache_key: str | None = None
    """Last, with defaults: a row spooled by an older proxy has none."""
    response_id: str | None = None
    replica: str | None = None


_LOGGED = (*requestlog.COLUMNS, "latency_ms", "response_id")
"""The request_log columns a commit fills: the exported format's, and the latency and the upstream's response id
the format leaves out."""

_PARAMETERS: tuple[str, ...] = CommitRow.__struct_fields__
assert set(_LOGGED) <= set(_PARAMETERS), set(_LOGGED) - set(_PARAMETERS)
assert {f"creation_{t}" for t in TIERS} | {f"write_multiplier_{t}" for t in TIERS} <= set(_PARAMETERS)

_PLACEHOLDERS = {name: f"${n}" for n, name in enumerate(_PARAMETERS, 1)}

# The log row always; the ledger row when billable; the cache changes only when this statement is
# the one that billed (a retried commit finds its ledger row and changes nothing). The upsert is
# memory.merge_write in SQL: an expired entry starts a new episode ({ts} is "now"); a live one keeps
# its created_at and only moves to a later expiry. Sorted so concurrent commits lock rows in one order. A principal
# with a budget has the cost added to its month's spend (docs/design.md#budgets), only by the statement that billed.
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
        principal_id, virtual_model, tokenizer_version, prefix_hash, cum_tokens, tier, created_at, expires_at, replica
    )
    SELECT {principal_id}, {virtual_model}, {tokenizer_version}, w.prefix_hash, w.cum_tokens, w.tier, {ts},
        w.expires_at, {replica}::text
    FROM unnest({write_hashes}::bytea[], {write_tokens}::integer[], {write_tiers}::text[],
                {write_expiries}::timestamptz[])
        AS w(prefix_hash, cum_tokens, tier, expires_at)
    WHERE EXISTS (SELECT 1 FROM bill)
    ORDER BY w.prefix_hash
    ON CONFLICT (principal_id, virtual_model, tokenizer_version, prefix_hash) DO UPDATE SET
        cum_tokens = EXCLUDED.cum_tokens,
        tier = EXCLUDED.tier,
        expires_at = EXCLUDED.expires_at,
        replica = COALESCE(EXCLUDED.replica, e.replica),
        created_at = CASE WHEN e.expires_at > {ts} THEN e.created_at ELSE EXCLUDED.created_at END
    WHERE e.expires_at <= {ts} OR EXCLUDED.expires_at > e.expires_at
    RETURNING 1
), spend AS (
    INSERT INTO budget_spend AS s (principal_id, month, spent)
    SELECT {principal_id}, date_trunc('month', {ts}, 'UTC'), {cost}::numeric
    WHERE EXISTS (SELECT 1 FROM bill) AND EXISTS (SELECT 1 FROM budgets b WHERE b.principal_id = {principal_id})
    ON CONFLICT (principal_id, month) DO UPDATE SET spent = s.spent + EXCLUDED.spent
    RETURNING 1
), refresh AS (
    UPDATE cache_entries SET expires_at = GREATEST(expires_at, {read_expires_at}::timestamptz),
        replica = COALESCE({replica}::text, replica)
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
        """Commit one finished request (see :meth:`commit_many`); False when it was already committed."""
        return (await self.commit_many([commit_row(record, refresh_read=refresh_read)]))[0]

    async def commit_many(self, rows: Sequence[CommitRow]) -> list[bool]:
        """Log, bill and apply each row, all in one round trip and one transaction; per row, False when it was
        already done (a retry). A row Postgres refuses fails the whole group (``IndexUnavailable("refused")``).

        The ledger row's request id is the idempotency key: when it already exists this is a retry, and
        nothing else is touched, so a request is never billed or written twice. A non-billable request only
        gets its log row.
        """
        args = [msgspec.structs.astuple(row) for row in rows]
        records = await self._db.run(lambda conn: conn.fetchmany(_COMMIT, args), commit=True)
        return [bool(r["billed"] if row.billable else r["logged"]) for r, row in zip(records, rows, strict=True)]


def commit_row(record: RequestRecord, *, refresh_read: bool = True) -> CommitRow:
    """The commit's parameters. ``refresh_read=False`` leaves the read's expiry to a write-behind
    ``PrefixIndex.refresh_many`` (Redis debounces refreshes of hot prefixes)."""
    split, chain, tariff = record.split, record.chain, record.tariff
    result = record.classification if record.billable and split.cache_valid else None
    writes = result.writes if result is not None else ()
    read = result.read if result is not None and refresh_read else None
    return CommitRow(
        request_id=record.request_id,
        ts=record.started_at,
        principal_id=record.scope.principal_id,
        virtual_model=record.scope.virtual_model,
        tokenizer_version=record.scope.tokenizer_version,
        api=record.api,
        status=record.status,
        prompt_tokens=split.prompt,
        completion_tokens=split.completion,
        read_tokens=split.read,
        creation_5m=split.creation.get("5m", 0),
        creation_1h=split.creation.get("1h", 0),
        creation_24h=split.creation.get("24h", 0),
        input_per_mtok=tariff.input_per_mtok,
        output_per_mtok=tariff.output_per_mtok,
        billed_cost=record.cost if record.billable else Decimal(0),  # a failed request is logged, not billed
        list_cost=record.list_cost,
        latency_ms=record.latency_ms,
        chain_hashes=[b.hash[:CHAIN_HASH_BYTES] for b in chain],
        chain_tokens=[b.tokens for b in chain],
        chain_roles=[b.role for b in chain],
        chain_tiers=list(record.sent_tiers) if record.sent_tiers is not None else [b.tier for b in chain],
        engine_cached_tokens=record.engine_cached_tokens,
        tariff_version=tariff.version or None,  # version 0: prices not (yet) stored as a tariff
        write_multiplier_5m=tariff.write_multipliers["5m"],
        write_multiplier_1h=tariff.write_multipliers["1h"],
        write_multiplier_24h=tariff.write_multipliers["24h"],
        read_multiplier=tariff.read_multiplier,
        uncached_tokens=split.uncached,
        cost=record.cost,
        billable=record.billable,
        write_hashes=[w.hash for w in writes],
        write_tokens=[w.tokens for w in writes],
        write_tiers=[w.tier for w in writes],
        write_expiries=[w.expires_at for w in writes],
        read_hash=read.hash if read is not None else None,
        read_expires_at=read.expires_at if read is not None else None,
        prompt_cache_key=record.prompt_cache_key,
        response_id=record.response_id,
        replica=record.replica,
    )
