"""docs/design.md#replay: the request log as JSON Lines, the one format export writes and import and replay read.

A line is a request's billing facts and its prefix chain, never prompt text. Reading is strict
(exact keys, exact types, decimals as strings) and every error names its line and field, so a
bad file is fixed, not half-imported: replay's numbers are only as good as this input.

Two readers share the rules. msgspec decodes a line into typed structs in C, writes it back to see it is
spelled as export spells it, and a few whole-chain checks finish it (:func:`_fast`); whatever it does not accept
outright, the strict reader
(:func:`parse_json_line`) reads again, and that one either accepts it or names the line and field.
So the fast reader only ever decides "valid, and this is the request", never an error message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, NoReturn, TypeGuard

import asyncpg
import msgspec

from promptcache.proxy.domain.classify import ChainBlock
from promptcache.proxy.domain.diagnose import Previous
from promptcache.proxy.domain.errors import clipped
from promptcache.proxy.domain.markers import CACHE_KEY_RULE, valid_cache_key
from promptcache.proxy.domain.nesting import deeper_than, too_deep
from promptcache.proxy.domain.tiers import TIERS, Tier
from promptcache.proxy.storage.postgres import Database

MAX_COUNT = 2**31 - 1
"""Token counts are Postgres ``integer`` columns: a larger value is refused where it comes in (a log line, an
upstream's usage), never left to fail the insert."""

_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")
_HEX = re.compile(r"[0-9a-fA-F]{2,64}")
"""With an even length: 1 to 32 bytes."""

_Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
_Text = Annotated[str, msgspec.Meta(min_length=1)]


class _WireBlock(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A chain item as msgspec decodes it; ``h`` is checked for the whole chain at once."""

    h: Annotated[str, msgspec.Meta(min_length=2, max_length=64)]
    t: _Count
    r: _Text
    m: Tier | None


class _WireLine(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A line as msgspec decodes it, its fields in the documented order (the strict reader's too)."""

    id: _Text
    ts: Annotated[datetime, msgspec.Meta(tz=True)]
    principal: _Text
    model: _Text
    tokenizer_version: _Text
    api: _Text
    status: Annotated[int, msgspec.Meta(ge=100, le=599)]
    prompt_tokens: _Count
    completion_tokens: _Count
    read_tokens: _Count
    creation_tokens: dict[str, _Count]
    input_per_mtok: str
    output_per_mtok: str
    billed_cost: str
    list_cost: str
    chain: list[_WireBlock]
    engine_cached_tokens: _Count | msgspec.UnsetType = msgspec.UNSET
    prompt_cache_key: str | msgspec.UnsetType = msgspec.UNSET


_OPTIONAL = ("engine_cached_tokens", "prompt_cache_key")
"""Keys a line may leave out: a fact the upstream did not report (docs/design.md#fields)."""
_KEYS = tuple(key for key in _WireLine.__struct_fields__ if key not in _OPTIONAL)
_CHAIN_KEYS = _WireBlock.__struct_fields__
_MONEY = ("input_per_mtok", "output_per_mtok", "billed_cost", "list_cost")
_KEY_SETS = {keys: frozenset(keys) for keys in (_KEYS, _CHAIN_KEYS, TIERS)}

COLUMNS = (
    "request_id", "ts", "principal_id", "virtual_model", "tokenizer_version", "api", "status",
    "prompt_tokens", "completion_tokens", "read_tokens", "creation_5m", "creation_1h", "creation_24h",
    "input_per_mtok", "output_per_mtok", "billed_cost", "list_cost",
    "chain_hashes", "chain_tokens", "chain_roles", "chain_tiers", "engine_cached_tokens", "prompt_cache_key",
)  # fmt: skip
"""The request_log columns the format carries, in :func:`_to_row` order: export selects them, import and
the ledger's commit insert them (the commit adds ``latency_ms``, which the format leaves out)."""
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM request_log"
# COLLATE "C" orders ids by code point, as Python does, whatever the database's collation.
_ORDER = ' ORDER BY ts, request_id COLLATE "C"'
_IMPORT_TABLE = "request_log_import"


class LoggedRequest(msgspec.Struct, frozen=True, gc=False):
    """One logged request, field for field the §9 keys; ``chain`` is ready for ``classify``.

    A struct the garbage collector does not track (it holds no cycles): replay makes millions of them.
    """

    id: str
    ts: datetime
    principal: str
    model: str
    tokenizer_version: str
    api: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    read_tokens: int
    creation_tokens: Mapping[str, int]
    """Tokens written per tier, every tier present."""
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    billed_cost: Decimal
    list_cost: Decimal
    chain: tuple[ChainBlock, ...]
    """Per block: the first bytes of its prefix hash, cumulative tokens, role and marker tier."""
    engine_cached_tokens: int | None = None
    """The upstream's own count of prompt tokens it served from its KV cache; None: not reported."""
    prompt_cache_key: str | None = None
    """OpenAI's ``prompt_cache_key`` as the client sent it; None: it sent none."""


class LogFormatError(ValueError):
    """A line that is not §9 JSON Lines; the message names the line and field to fix."""

    def __init__(self, lineno: int, field: str | None, detail: str) -> None:
        self.lineno = lineno
        self.field = field
        self.detail = detail
        super().__init__(f"line {lineno}: {field}: {detail}" if field else f"line {lineno}: {detail}")


class _Invalid(Exception):
    """A field's problem, before the line number is known."""

    def __init__(self, field: str | None, detail: str) -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail


def format_timestamp(ts: datetime) -> str:
    """RFC 3339 in UTC with ``Z``; microseconds only when there are any."""
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 timestamp (an offset is required) as an aware UTC datetime; ValueError otherwise."""
    if not _TIMESTAMP.fullmatch(text):
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp such as 2025-03-01T12:00:00Z")
    try:
        return datetime.fromisoformat(text.upper()).astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{text!r} is out of range in UTC (years 1 to 9999)") from None


def to_json_line(request: LoggedRequest) -> str:
    """One line of the format, without its newline: keys in documented order, decimals as plain strings."""
    document = {
        "id": request.id,
        "ts": format_timestamp(request.ts),
        "principal": request.principal,
        "model": request.model,
        "tokenizer_version": request.tokenizer_version,
        "api": request.api,
        "status": request.status,
        "prompt_tokens": request.prompt_tokens,
        "completion_tokens": request.completion_tokens,
        "read_tokens": request.read_tokens,
        "creation_tokens": {tier: request.creation_tokens[tier] for tier in TIERS},
        **{key: format(getattr(request, key), "f") for key in _MONEY},
        "chain": [{"h": b.hash.hex(), "t": b.tokens, "r": b.role, "m": b.tier} for b in request.chain],
    }
    if request.engine_cached_tokens is not None:
        document["engine_cached_tokens"] = request.engine_cached_tokens
    if request.prompt_cache_key is not None:
        document["prompt_cache_key"] = request.prompt_cache_key
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def parse_json_line(line: str, lineno: int = 1) -> LoggedRequest:
    """Read one line; anything off the format raises :class:`LogFormatError` naming ``lineno``."""
    try:
        document = json.loads(line.rstrip("\r\n"), object_pairs_hook=_no_duplicates)
        if deeper_than(document):
            raise _Invalid(None, too_deep())
        return _request(document)
    except RecursionError:
        raise LogFormatError(lineno, None, too_deep()) from None
    except json.JSONDecodeError as exc:
        raise LogFormatError(lineno, None, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    except _Invalid as exc:
        raise LogFormatError(lineno, exc.field, exc.detail) from None


READ_BUFFER = 1 << 20
"""Bytes read from a log file at a time: fewer, larger reads than the default buffer (a few % of a replay)."""


def read_jsonl(source: str | os.PathLike[str] | Iterable[str] | Iterable[bytes]) -> Iterator[LoggedRequest]:
    """Requests from a file path or an open stream (text or binary), lazily; blank lines are skipped."""
    if isinstance(source, str | os.PathLike):
        with open(source, "rb", buffering=READ_BUFFER) as stream:
            yield from read_jsonl(stream)
        return
    lines: Iterable[str | bytes] = source
    for lineno, raw in enumerate(lines, 1):
        request = parse_line(raw, lineno)
        if request is not None:
            yield request


def parse_line(raw: bytes | str, lineno: int) -> LoggedRequest | None:
    """One line of a file: by the fast reader, else the strict one (bytes); None for a blank line."""
    if isinstance(raw, bytes):
        request = _fast(raw)
        if request is not None:
            return request
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LogFormatError(lineno, None, f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    else:
        line = raw
    return parse_json_line(line, lineno) if line.strip() else None


Shard = tuple[int, int]
"""``(k, n)``: the principals whose :data:`SHARD_OF` is ``k`` of ``n`` shards."""
SHARD_OF = "mod(('x' || left(md5(principal_id), 8))::bit(32)::bigint, {shards})"
"""A principal's shard in SQL: its MD5's first 32 bits (unsigned) modulo the number of shards. Shards hold whole
principals, so whole cache scopes; MD5 because Postgres 15 has it built in and it is the same everywhere."""


async def export_rows(
    conn: asyncpg.Connection[asyncpg.Record],
    since: datetime | None = None,
    until: datetime | None = None,
    models: Sequence[str] | None = None,
    shard: Shard | None = None,
) -> AsyncIterator[LoggedRequest]:
    """Logged requests with ``since <= ts < until`` for ``models`` (None: no bound) and the principals of
    ``shard`` (None: all), in (ts, id) order.

    Streams through a cursor in one read-only snapshot, so a long export neither holds the whole
    log in memory nor mixes in rows committed while it runs.
    """
    where, args = _where(since, until, models, shard=shard)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        async for row in conn.cursor(_SELECT + where + _ORDER, *args, prefetch=1000):
            yield _from_row(row)


async def count_rows(
    conn: asyncpg.Connection[asyncpg.Record],
    since: datetime | None = None,
    until: datetime | None = None,
    models: Sequence[str] | None = None,
) -> int:
    """How many 2xx requests :func:`export_rows` would yield for the same bounds: the ones replay simulates.

    One count, so a caller can size the work (and see an empty window) before streaming anything.
    """
    where, args = _where(since, until, models, ["status BETWEEN 200 AND 299"])
    return int(await conn.fetchval("SELECT count(*) FROM request_log" + where, *args))


def _where(since: datetime | None, until: datetime | None, models: Sequence[str] | None,
           conditions: Sequence[str] = (), shard: Shard | None = None) -> tuple[str, list[object]]:
    """The WHERE clause (with a leading space, or empty) and its arguments for the export bounds."""
    terms = list(conditions)
    args: list[object] = []
    if shard is not None:
        k, n = shard
        if not 0 <= k < n:
            raise ValueError(f"shard {k} of {n} does not exist")
        args += [n, k]
        terms.append(f"{SHARD_OF.format(shards=f'${len(args) - 1}::bigint')} = ${len(args)}")
    if since is not None:
        args.append(since)
        terms.append(f"ts >= ${len(args)}")
    if until is not None:
        args.append(until)
        terms.append(f"ts < ${len(args)}")
    if models is not None:
        args.append(list(models))
        terms.append(f"virtual_model = ANY(${len(args)})")
    return (f" WHERE {' AND '.join(terms)}" if terms else ""), args


async def import_rows(conn: asyncpg.Connection[asyncpg.Record], rows: Iterable[LoggedRequest]) -> int:
    """Log every request whose id is not logged yet; returns how many were new.

    All or nothing: rows stream by COPY into a temporary table inside one transaction, so an
    exception from ``rows`` (a malformed line) imports nothing. Latency is not part of the
    format, so imported rows carry 0.
    """
    columns = ", ".join(COLUMNS)
    async with conn.transaction():
        await conn.execute(f"CREATE TEMPORARY TABLE {_IMPORT_TABLE} AS {_SELECT} WITH NO DATA")
        await conn.copy_records_to_table(_IMPORT_TABLE, records=(_to_row(r) for r in rows), columns=COLUMNS)
        status = await conn.execute(
            f"INSERT INTO request_log ({columns}, latency_ms) SELECT {columns}, 0 FROM {_IMPORT_TABLE}"
            " ON CONFLICT (request_id) DO NOTHING"
        )
        await conn.execute(f"DROP TABLE {_IMPORT_TABLE}")
    return int(status.split()[-1])


def _from_row(row: asyncpg.Record) -> LoggedRequest:
    chain = zip(row["chain_hashes"], row["chain_tokens"], row["chain_roles"], row["chain_tiers"], strict=True)
    return LoggedRequest(
        id=row["request_id"],
        ts=row["ts"],
        principal=row["principal_id"],
        model=row["virtual_model"],
        tokenizer_version=row["tokenizer_version"],
        api=row["api"],
        status=row["status"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        read_tokens=row["read_tokens"],
        creation_tokens={tier: row[f"creation_{tier}"] for tier in TIERS},
        input_per_mtok=row["input_per_mtok"],
        output_per_mtok=row["output_per_mtok"],
        billed_cost=row["billed_cost"],
        list_cost=row["list_cost"],
        chain=tuple(ChainBlock(*block) for block in chain),
        engine_cached_tokens=row["engine_cached_tokens"],
        prompt_cache_key=row["prompt_cache_key"],
    )


def _to_row(r: LoggedRequest) -> tuple[object, ...]:
    """``r`` in :data:`COLUMNS` order."""
    return (
        r.id, r.ts, r.principal, r.model, r.tokenizer_version, r.api, r.status,
        r.prompt_tokens, r.completion_tokens, r.read_tokens, *(r.creation_tokens[tier] for tier in TIERS),
        r.input_per_mtok, r.output_per_mtok, r.billed_cost, r.list_cost,
        [b.hash for b in r.chain], [b.tokens for b in r.chain], [b.role for b in r.chain], [b.tier for b in r.chain],
        r.engine_cached_tokens, r.prompt_cache_key,
    )  # fmt: skip


# --- reading one line ---------------------------------------------------------------------------


_PRICES: dict[str, Decimal] = {}
"""Validated per-token prices by their text: a log repeats a few of them on every line."""
_PRICES_KEPT = 256
_COSTS = re.compile(r"[0-9]+(\.[0-9]+)? [0-9]+(\.[0-9]+)?")


def _price(text: str) -> Decimal | None:
    price = _PRICES.get(text)
    if price is None and _DECIMAL.fullmatch(text):
        price = Decimal(text)
        if len(_PRICES) < _PRICES_KEPT:
            _PRICES[text] = price
    return price


def _fast(line: bytes, fromhex: Callable[[str], bytes] = bytes.fromhex,
          block: type[ChainBlock] = ChainBlock) -> LoggedRequest | None:
    """The request on ``line`` if it is valid and written as :func:`to_json_line` writes; None: let the strict
    reader decide.

    msgspec keeps the last of a repeated key, which the format refuses; a line that msgspec writes back byte for
    byte has none (nor spaces, escapes or another key order, which the strict reader takes in its stride).
    ``fromhex`` and ``block`` are bound as defaults: locals are found faster than globals, once per block.
    """
    try:
        w = _DECODER.decode(line)
    except msgspec.DecodeError:
        return None
    _ENCODER.encode_into(w, _WRITTEN)
    if not line.startswith(_WRITTEN) or line[len(_WRITTEN):] not in _LINE_ENDS:
        return None
    chain = w.chain
    tokens = [b.t for b in chain]
    cache_key = None if w.prompt_cache_key is msgspec.UNSET else w.prompt_cache_key
    creation = w.creation_tokens
    in_order = tuple(creation) == TIERS
    input_price, output_price = _price(w.input_per_mtok), _price(w.output_per_mtok)
    # A hash is 1 to 32 bytes of hex. fromhex refuses other characters and odd lengths but skips whitespace,
    # of which only a space can be in a string here (control characters would be escaped).
    if (tokens != sorted(tokens) or input_price is None or output_price is None
            or (cache_key is not None and not valid_cache_key(cache_key))
            or (not in_order and creation.keys() != _KEY_SETS[TIERS])
            or (b" " in line and " " in "".join([b.h for b in chain]))
            or not _COSTS.fullmatch(f"{w.billed_cost} {w.list_cost}")):
        return None
    try:
        blocks = tuple([block(fromhex(b.h), b.t, b.r, b.m) for b in chain])
        ts = w.ts if w.ts.tzinfo is UTC else w.ts.astimezone(UTC)
    except (ValueError, OverflowError):
        return None
    if not in_order:  # written in another order: the same facts, kept in the documented one
        creation = {tier: creation[tier] for tier in TIERS}
    return LoggedRequest(
        w.id, ts, w.principal, w.model, w.tokenizer_version, w.api, w.status, w.prompt_tokens, w.completion_tokens,
        w.read_tokens, creation, input_price, output_price, Decimal(w.billed_cost), Decimal(w.list_cost), blocks,
        None if w.engine_cached_tokens is msgspec.UNSET else w.engine_cached_tokens, cache_key,
    )


_DECODER = msgspec.json.Decoder(_WireLine)
_ENCODER = msgspec.json.Encoder()
_WRITTEN = bytearray()
"""What msgspec writes back, reused so that no line allocates it. Shared by threads, and still safe: a line is
accepted only if it equals the canonical spelling of some decoded line, and so of the one it decodes to itself."""
_LINE_ENDS = (b"", b"\n", b"\r\n")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A repeated key would silently keep its last value; in a billing record that is an error."""
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise _Invalid(key, "key appears twice")
        document[key] = value
    return document


def _request(document: object) -> LoggedRequest:
    optional = {key: document.pop(key) for key in _OPTIONAL if key in document} if isinstance(document, dict) else {}
    fields = _exact_keys(document, _KEYS, None)

    status = fields["status"]
    if not _is_int(status) or not 100 <= status <= 599:
        _invalid("status", "must be an HTTP status (an integer from 100 to 599)", status)
    creation = _exact_keys(fields["creation_tokens"], TIERS, "creation_tokens")
    chain = fields["chain"]
    if not isinstance(chain, list):
        _invalid("chain", "must be an array", chain)
    return LoggedRequest(
        id=_text(fields, "id"),
        ts=_timestamp(fields["ts"]),
        principal=_text(fields, "principal"),
        model=_text(fields, "model"),
        tokenizer_version=_text(fields, "tokenizer_version"),
        api=_text(fields, "api"),
        status=status,
        prompt_tokens=_count(fields["prompt_tokens"], "prompt_tokens"),
        completion_tokens=_count(fields["completion_tokens"], "completion_tokens"),
        read_tokens=_count(fields["read_tokens"], "read_tokens"),
        creation_tokens={tier: _count(creation[tier], f"creation_tokens.{tier}") for tier in TIERS},
        input_per_mtok=_money(fields, "input_per_mtok"),
        output_per_mtok=_money(fields, "output_per_mtok"),
        billed_cost=_money(fields, "billed_cost"),
        list_cost=_money(fields, "list_cost"),
        chain=_chain(chain),
        engine_cached_tokens=_count(optional["engine_cached_tokens"], "engine_cached_tokens")
        if "engine_cached_tokens" in optional else None,
        prompt_cache_key=_cache_key(optional["prompt_cache_key"]) if "prompt_cache_key" in optional else None,
    )


def _cache_key(value: object) -> str:
    if not valid_cache_key(value):
        _invalid("prompt_cache_key", CACHE_KEY_RULE, value)
    return str(value)


def _chain(items: list[Any]) -> tuple[ChainBlock, ...]:
    blocks: list[ChainBlock] = []
    for i, item in enumerate(items):
        block = _exact_keys(item, _CHAIN_KEYS, "chain", i)
        digest = block["h"]
        if not isinstance(digest, str) or not _HEX.fullmatch(digest) or len(digest) % 2:
            _invalid(f"chain[{i}].h", "must be a hex string of 1 to 32 bytes", digest)
        tokens = block["t"]
        if not _counted(tokens):
            _invalid(f"chain[{i}].t", _COUNT_RULE, tokens)
        if blocks and tokens < blocks[-1].tokens:
            _invalid(f"chain[{i}].t", f"cumulative tokens must not decrease (previous block: {blocks[-1].tokens})",
                     tokens)
        tier = block["m"]
        if tier is not None and tier not in TIERS:
            _invalid(f"chain[{i}].m", f"must be null or one of {', '.join(TIERS)}", tier)
        blocks.append(ChainBlock(bytes.fromhex(digest), tokens, _text(block, "r", "chain", i), tier))
    return tuple(blocks)


def _exact_keys(value: object, keys: tuple[str, ...], where: str | None, index: int | None = None) -> dict[str, Any]:
    """``value`` as an object with exactly ``keys``; the first missing key is reported in ``keys`` order.

    ``where`` (and ``index``, for an array item) name it in errors; the name is only built for one.
    """
    if isinstance(value, dict):
        if value.keys() == _KEY_SETS[keys]:
            return value
        missing = next((key for key in keys if key not in value), None)
    named = where if index is None else f"{where}[{index}]"
    if not isinstance(value, dict):
        _invalid(named, "must be a JSON object", value)
    if missing is not None:
        raise _Invalid(f"{named}.{missing}" if named else missing, "missing")
    raise _Invalid(named, f"unexpected key {sorted(set(value) - set(keys))[0]!r}")


def _text(fields: Mapping[str, Any], key: str, where: str | None = None, index: int | None = None) -> str:
    value = fields[key]
    if not isinstance(value, str) or not value:
        named = where if index is None else f"{where}[{index}]"
        _invalid(f"{named}.{key}" if named else key, "must be a non-empty string", value)
    return value


def _timestamp(value: object) -> datetime:
    if not isinstance(value, str):
        _invalid("ts", "must be an RFC 3339 timestamp string", value)
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise _Invalid("ts", str(exc)) from None


_COUNT_RULE = f"must be an integer from 0 to {MAX_COUNT}"


def _counted(value: object) -> TypeGuard[int]:
    return _is_int(value) and 0 <= value <= MAX_COUNT


def _count(value: object, field: str) -> int:
    if not _counted(value):
        _invalid(field, _COUNT_RULE, value)
    return value


def _money(fields: Mapping[str, Any], key: str) -> Decimal:
    """Money is a non-negative decimal string: a JSON number would pass through a float and lose cents."""
    value = fields[key]
    if not isinstance(value, str) or not _DECIMAL.fullmatch(value):
        _invalid(key, 'must be a non-negative decimal string such as "0.0045"', value)
    return Decimal(value)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _invalid(field: str | None, rule: str, value: object) -> NoReturn:
    shown = json.dumps(value, ensure_ascii=False)
    raise _Invalid(field, f"{rule}, got {clipped(shown)}")


_PREVIOUS = """
(SELECT virtual_model, ts, status, chain_hashes, chain_tokens, chain_roles, chain_tiers FROM request_log
    WHERE request_id = $2 AND principal_id = $1)
UNION ALL
(SELECT virtual_model, ts, status, chain_hashes, chain_tokens, chain_roles, chain_tiers FROM request_log
    WHERE principal_id = $1 AND response_id = $2 ORDER BY ts DESC LIMIT 1)
LIMIT 1
"""


async def previous_request(db: Database, principal: str, ident: str) -> Previous | None:
    """The principal's own logged request named by our request id or the upstream's response id, for
    cache-miss diagnostics; another principal's is not found."""
    row = await db.run(lambda conn: conn.fetchrow(_PREVIOUS, principal, ident))
    if row is None:
        return None
    return Previous(row["virtual_model"], row["ts"], row["status"], row["chain_hashes"], row["chain_tokens"],
                    row["chain_roles"], row["chain_tiers"])
