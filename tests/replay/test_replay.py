"""docs/design.md#replay replay: hand-computed projections, a replay of the proxy's own log, determinism, intervals.

The hand-computed logs are priced at 1.00 per million input tokens (2.00 output), so a cost is
the weighted token count divided by 10⁶: a 5m write of 1000 tokens is 1000·1.25 = 1250 → 0.00125.
Unless a test says otherwise, a request's billed cost is its list cost (recorded without caching),
and the proposed policy has the default multipliers: 5m 1.25, 1h 2.0, 24h 2.5, read 0.1.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import asyncpg
import msgspec
import openai
import pytest

from promptcache.operator.replay.engine import REQUESTS, ReplayError, canonical, report, simulate
from promptcache.operator.replay.misses import REASONS
from promptcache.operator.replay.proposal import Proposal
from promptcache.proxy.domain.classify import ChainBlock
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.tiers import TIERS
from promptcache.proxy.storage.requestlog import LoggedRequest, export_rows, to_json_line
from promptcache.proxy.testing.simulator import REPLY, Simulator

from support.conversation import as_responses_input, with_openai_breakpoints
from support.proxy import model_config, new_key, running_proxy, settle, text, unique, words

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
MILLION = Decimal(1_000_000)
ITERATIONS = 200


def hb(name: str) -> bytes:
    """A recorded prefix hash (the log keeps the first 16 bytes)."""
    return hashlib.sha256(name.encode()).digest()[:16]


def blk(name: str, tokens: int, tier: str | None = None, role: str = "user") -> ChainBlock:
    return ChainBlock(hb(name), tokens, role, tier)


def logged(
    rid: str, ts: datetime, chain: Sequence[ChainBlock], prompt: int, *, completion: int = 0,
    principal: str = "alice", model: str = "m", status: int = 200, billed: str | None = None,
    input_per_mtok: str = "1", output_per_mtok: str = "2",
) -> LoggedRequest:
    """A logged request; billed defaults to the list price (the recording cached nothing)."""
    inp, out = Decimal(input_per_mtok), Decimal(output_per_mtok)
    list_cost = (prompt * inp + completion * out) / MILLION
    return LoggedRequest(
        id=rid, ts=ts, principal=principal, model=model, tokenizer_version="words@test", api="openai",
        status=status, prompt_tokens=prompt, completion_tokens=completion, read_tokens=0,
        creation_tokens={tier: 0 for tier in TIERS}, input_per_mtok=inp, output_per_mtok=out,
        billed_cost=list_cost if billed is None else Decimal(billed), list_cost=list_cost, chain=tuple(chain),
    )


def proposal(spec: Mapping[str, Any], tier_override: Mapping[str, str] | None = None,
             prices: Mapping[str, tuple[Decimal, Decimal]] | None = None) -> Proposal:
    return Proposal(CachePolicy.from_spec(spec), dict(spec), dict(tier_override or {}), dict(prices or {}))


def replay(requests: Sequence[LoggedRequest], spec: Mapping[str, Any], *, unit: str = "principal",
           tier_override: Mapping[str, str] | None = None,
           prices: Mapping[str, tuple[Decimal, Decimal]] | None = None, seed: int = 0) -> dict[str, Any]:
    p = proposal(spec, tier_override, prices)
    return report(simulate(requests, p, unit), p, seed=seed, iterations=ITERATIONS, unit=unit).result


def costs(result: Mapping[str, Any]) -> tuple[Decimal, Decimal, Decimal]:
    """(baseline, projected, savings) of the summary, as decimals."""
    s = result["summary"]
    return Decimal(s["baseline_cost"]), Decimal(s["projected_cost"]), Decimal(s["savings"])


# A system prompt of 1000 tokens marked 5m, then a 10-token question: prompt 1010.
#   write:  1000·1.25 + 10 = 1260 → 0.00126
#   read:   1000·0.1  + 10 =  110 → 0.00011
#   list:   1010             → 0.00101
CACHED = [blk("sys", 1000, "5m", "system"), blk("q", 1010)]
BASE_POLICY: dict[str, Any] = {"minPrefixTokens": 0}


def misses(**counts: int) -> dict[str, int]:
    """A summary's misses by reason: zero but for ``counts``."""
    return {reason: counts.get(reason, 0) for reason in REASONS}


# --- §5 classification through replay, by hand ---------------------------------------------------


@pytest.mark.parametrize(("gap", "projected", "hit_rate", "read_ratio"), [
    # Exactly one TTL later: the entry expired at T0+5m and is live only strictly before → miss, rewrite.
    #   1260 + 1260 = 2520 → 0.00252; no read.
    (timedelta(minutes=5), "0.00252", "0.000000", "0.000000"),
    # One second shorter: live → read. 1260 + 110 = 1370 → 0.00137; 1 of 2 requests read;
    #   read tokens 1000 / prompt 2020 = 0.4950495… → 0.495050.
    (timedelta(minutes=4, seconds=59), "0.00137", "0.500000", "0.495050"),
])
def test_a_gap_of_exactly_one_ttl_misses_and_one_second_less_hits(
        gap: timedelta, projected: str, hit_rate: str, read_ratio: str) -> None:
    log = [logged("r1", T0, CACHED, 1010), logged("r2", T0 + gap, CACHED, 1010)]
    result = replay(log, BASE_POLICY)
    s = result["summary"]
    assert s["requests"] == 2
    assert s["baseline_cost"] == s["list_cost"] == "0.00202"  # 2 · 1010 / 10⁶
    assert s["projected_cost"] == projected
    assert (s["hit_rate"], s["read_token_ratio"]) == (hit_rate, read_ratio)
    baseline, proj, savings = costs(result)
    assert savings == baseline - proj


def test_the_hit_case_summary_in_full() -> None:
    log = [logged("r1", T0, CACHED, 1010), logged("r2", T0 + timedelta(minutes=4, seconds=59), CACHED, 1010)]
    s = replay(log, BASE_POLICY)["summary"]
    # savings 0.00202 - 0.00137 = 0.00065; pct 100 · 0.00065 / 0.00202 = 32.17821… → 32.1782
    # creation: one 5m write of 1000 tokens: 1000 · 1 · 1.25 / 10⁶ = 0.00125
    assert s == {
        "requests": 2, "baseline_cost": "0.00202", "projected_cost": "0.00137", "list_cost": "0.00202",
        "savings": "0.00065", "savings_pct": "32.1782", "read_token_ratio": "0.495050", "hit_rate": "0.500000",
        "creation_cost": {"5m": "0.00125", "1h": "0", "24h": "0"},
        # Recorded: both marked, neither wrote (the recording cached nothing). Projected: r1 is the first.
        "misses": {"recorded": misses(below_minimum=2), "projected": misses(never_written=1)},
    }


def test_a_read_slides_the_entry_past_its_first_expiry() -> None:
    # r1 T0 writes (expires T0+5m): 1260. r2 at 4m reads and slides the expiry to 4m+5m = 9m: 110.
    # r3 at 8m is past the first expiry but before 9m: read, slides to 13m: 110.
    # r4 at 13m is exactly one TTL after the last read: miss, rewrite: 1260.
    # Total 1260 + 110 + 110 + 1260 = 2740 → 0.00274; 2 of 4 read; read 2000 / prompt 4040 → 0.495050.
    log = [logged(f"r{i}", T0 + timedelta(minutes=m), CACHED, 1010) for i, m in enumerate((0, 4, 8, 13), 1)]
    s = replay(log, BASE_POLICY)["summary"]
    assert (s["projected_cost"], s["hit_rate"], s["read_token_ratio"]) == ("0.00274", "0.500000", "0.495050")
    assert s["creation_cost"]["5m"] == "0.0025"  # two writes of 1000 · 1.25
    # Without r2's refresh r3 misses (T0+5m passed) and writes (expires 13m), so r4 at 13m misses too:
    # 3 · 1260 = 3780 → 0.00378.
    s = replay([log[0], log[2], log[3]], BASE_POLICY)["summary"]
    assert (s["projected_cost"], s["hit_rate"]) == ("0.00378", "0.000000")


def test_a_tier_override_turns_5m_misses_into_1h_reads() -> None:
    log = [logged("r1", T0, CACHED, 1010), logged("r2", T0 + timedelta(minutes=30), CACHED, 1010)]
    # As recorded (5m): both miss, 2 · 1260 = 2520 → 0.00252.
    s = replay(log, BASE_POLICY)["summary"]
    assert (s["projected_cost"], s["hit_rate"], s["creation_cost"]["5m"]) == ("0.00252", "0.000000", "0.0025")
    # 5m → 1h: r1 writes at 1h, 1000·2.0 + 10 = 2010; r2 (30m later) reads, 110. 2120 → 0.00212.
    result = replay(log, BASE_POLICY, tier_override={"5m": "1h"})
    s = result["summary"]
    assert (s["projected_cost"], s["hit_rate"]) == ("0.00212", "0.500000")
    assert s["creation_cost"] == {"5m": "0", "1h": "0.002", "24h": "0"}
    assert result["params"]["tier_override"] == {"5m": "1h"}


def test_min_prefix_tokens_is_inclusive() -> None:
    log = [logged("r1", T0, CACHED, 1010), logged("r2", T0 + timedelta(minutes=1), CACHED, 1010)]
    # The breakpoint at 1000 tokens is below 1001: neither written nor looked up; list price 2·1010.
    s = replay(log, {"minPrefixTokens": 1001})["summary"]
    assert (s["projected_cost"], s["savings"], s["savings_pct"], s["hit_rate"]) == (
        "0.00202", "0", "0.0000", "0.000000")
    # At exactly 1000 it is cached: 1260 + 110 → 0.00137.
    assert replay(log, {"minPrefixTokens": 1000})["summary"]["projected_cost"] == "0.00137"


def test_automatic_last_user_message_marks_unmarked_recordings() -> None:
    # No markers were recorded. Turn 1: system 1000 · user 1200. Turn 2 (1 minute later) adds
    # assistant 1300 · user 1500 · a trailing assistant prefill 1550.
    turn1 = [blk("sys", 1000, None, "system"), blk("u1", 1200)]
    turn2 = [*turn1, blk("a1", 1300, None, "assistant"), blk("u2", 1500), blk("a2", 1550, None, "assistant")]
    log = [logged("r1", T0, turn1, 1200), logged("r2", T0 + timedelta(minutes=1), turn2, 1550)]
    auto = {"minPrefixTokens": 0, "automatic": {"mode": "lastUserMessage", "ttl": "5m"}}
    # lastUserMessage: r1 marks u1 → write 1200·1.25 = 1500.
    #   r2 marks u2 (not the trailing assistant) → reads u1 (1200·0.1 = 120), writes u2 1500 - 1200 = 300
    #   at 5m (375), the tail 50 uncached: 120 + 375 + 50 = 545. Total 2045 → 0.002045.
    #   creation 5m: (1200 + 300) · 1.25 = 1875 → 0.001875.
    s = replay(log, auto)["summary"]
    assert (s["projected_cost"], s["hit_rate"], s["creation_cost"]["5m"]) == ("0.002045", "0.500000", "0.001875")
    # lastBlock marks a2 instead: r2 reads 120 and writes 1550 - 1200 = 350 · 1.25 = 437.5; 1500 + 557.5 = 2057.5.
    last_block = {"minPrefixTokens": 0, "automatic": {"mode": "lastBlock", "ttl": "5m"}}
    assert replay(log, last_block)["summary"]["projected_cost"] == "0.0020575"
    # Automatic off: nothing is marked, list price 1200 + 1550 = 2750.
    assert replay(log, BASE_POLICY)["summary"]["projected_cost"] == "0.00275"


def test_changed_multipliers_change_write_and_read_cost() -> None:
    log = [logged("r1", T0, CACHED, 1010), logged("r2", T0 + timedelta(minutes=1), CACHED, 1010)]
    # Defaults: 1260 + 110 → 0.00137. With 5m x2 and read x0.5: 1000·2 + 10 = 2010; 1000·0.5 + 10 = 510.
    # 2520 → 0.00252; creation 5m 1000·2 = 2000 → 0.002.
    s = replay(log, {"minPrefixTokens": 0, "writeMultipliers": {"5m": "2"}, "readMultiplier": "0.5"})["summary"]
    assert (s["projected_cost"], s["creation_cost"]["5m"]) == ("0.00252", "0.002")
    assert replay(log, BASE_POLICY)["summary"]["projected_cost"] == "0.00137"


def test_a_disabled_tier_falls_back_to_the_default() -> None:
    marked_1h = [blk("sys", 1000, "1h", "system"), blk("q", 1010)]
    log = [logged("r1", T0, marked_1h, 1010), logged("r2", T0 + timedelta(minutes=10), marked_1h, 1010)]
    # All tiers enabled: r1 writes 1h, 2010; r2 reads 10 minutes later, 110. 2120 → 0.00212.
    assert replay(log, BASE_POLICY)["summary"]["projected_cost"] == "0.00212"
    # Only 5m enabled: the 1h marker becomes 5m (the default). r1 writes 1260, r2 misses 10 minutes later
    # and rewrites 1260: 2520 → 0.00252, all at 5m.
    s = replay(log, {"minPrefixTokens": 0, "enabledTtls": ["5m"]})["summary"]
    assert (s["projected_cost"], s["hit_rate"]) == ("0.00252", "0.000000")
    assert s["creation_cost"] == {"5m": "0.0025", "1h": "0", "24h": "0"}
    # 5m and 24h enabled, default 24h: 1h → 24h. r1 writes 1000·2.5 + 10 = 2510, r2 reads 110: 2620.
    s = replay(log, {"minPrefixTokens": 0, "enabledTtls": ["5m", "24h"], "defaultTtl": "24h"})["summary"]
    assert (s["projected_cost"], s["creation_cost"]["24h"]) == ("0.00262", "0.0025")


def test_requests_without_chains_and_non_2xx_are_counted_in_caveats() -> None:
    log = [
        # A failed request: not simulated, so its chain writes nothing...
        logged("r1", T0, CACHED, 1010, status=502, billed="0"),
        # ...and this one misses: 1260. A chain-less request is left out entirely.
        logged("r2", T0 + timedelta(minutes=1), CACHED, 1010),
        logged("r3", T0 + timedelta(minutes=2), [], 1010),
    ]
    result = replay(log, BASE_POLICY)
    s = result["summary"]
    assert (s["requests"], s["baseline_cost"], s["projected_cost"], s["hit_rate"]) == (
        1, "0.00101", "0.00126", "0.000000")
    assert "1 requests had no prefix chain and were left out" in result["caveats"]
    assert "1 non-2xx requests were skipped" in result["caveats"]


def test_savings_are_negative_when_the_policy_costs_more() -> None:
    # Billed 0.001 (say, a cheaper recording); the proposal writes 1260 → 0.00126.
    # savings 0.001 - 0.00126 = -0.00026; pct 100 · -0.00026 / 0.001 = -26.
    result = replay([logged("r1", T0, CACHED, 1010, billed="0.001")], BASE_POLICY)
    s = result["summary"]
    assert (s["baseline_cost"], s["projected_cost"], s["savings"], s["savings_pct"]) == (
        "0.001", "0.00126", "-0.00026", "-26.0000")
    # One cluster: every resample is that cluster, so the intervals collapse onto the (negative) point,
    # give or take the last place (the resamples sum floats; the ends are rounded outwards).
    for name, point, quantum in (("savings", "-0.00026", "0.00000001"), ("savings_pct", "-26", "0.0001")):
        lo, hi = map(Decimal, result["intervals"][name])
        exact, step = Decimal(point), Decimal(quantum)
        assert exact - step <= lo <= exact <= hi <= exact + step, name


def test_price_overrides_apply_to_their_model_only() -> None:
    log = [
        logged("r1", T0, CACHED, 1010, completion=100),
        logged("r2", T0, CACHED, 1010, completion=100, model="other"),
    ]
    # Own prices (1, 2): 1000·1.25 + 10 + 100·2 = 1460 each.
    # m at (3, 15): 1000·3·1.25 + 10·3 + 100·15 = 3750 + 30 + 1500 = 5280; other stays 1460; total 6740.
    result = replay(log, BASE_POLICY, prices={"m": (Decimal("3"), Decimal("15"))})
    assert result["summary"]["projected_cost"] == "0.00674"
    # creation 5m: 3750 + 1250 = 5000 → 0.005
    assert result["summary"]["creation_cost"]["5m"] == "0.005"
    assert [(m["model"], m["projected_cost"], m["baseline_cost"]) for m in result["per_model"]] == [
        ("m", "0.00528", "0.00121"), ("other", "0.00146", "0.00121")]  # baseline: 1010 + 200 each
    assert result["params"]["pricing_overrides"] == {"m": {"inputPerMTok": "3", "outputPerMTok": "15"}}
    assert replay(log, BASE_POLICY)["summary"]["projected_cost"] == "0.00292"  # 2 · 1460


def test_money_is_written_as_plain_decimal_strings() -> None:
    # 10 million uncached tokens at 1.00: exactly 10 dollars, written "10", not "1E+1"; savings of
    # 1.1·10⁻⁷ are "0.00000011", not "1.1E-7" (§9: decimals as strings, plain like the log's).
    log = [logged("r1", T0, [blk("big", 10_000_000)], 10_000_000, billed="10.00000011")]
    result = replay(log, BASE_POLICY)
    s = result["summary"]
    assert (s["baseline_cost"], s["projected_cost"], s["list_cost"], s["savings"]) == (
        "10.00000011", "10", "10", "0.00000011")
    assert result["intervals"]["projected_cost"] == ["10", "10"]
    lo, hi = result["intervals"]["savings"]  # a float difference, rounded outwards to whole 10⁻⁸
    assert lo in ("0.0000001", "0.00000011") and hi in ("0.00000011", "0.00000012")


@pytest.mark.parametrize(("unit", "clusters"), [
    ("principal", {"alice": 2, "bob": 2}),
    ("day", {"2025-03-01": 1, "2025-03-02": 2, "2025-03-03": 1}),
    ("request", {"r1": 1, "r2": 1, "r3": 1, "r4": 1}),
])
def test_clusters_by_principal_day_or_request(unit: str, clusters: dict[str, int]) -> None:
    log = [
        logged("r1", T0, CACHED, 1010),
        logged("r2", T0 + timedelta(days=1), CACHED, 1010),
        logged("r3", T0 + timedelta(days=1, hours=1), CACHED, 1010, principal="bob"),
        logged("r4", T0 + timedelta(days=2), CACHED, 1010, principal="bob"),
    ]
    p = proposal(BASE_POLICY)
    sim = simulate(log, p, unit)
    assert {k: int(row[REQUESTS]) for k, row in sim.clusters.items()} == clusters
    result = report(sim, p, seed=0, iterations=ITERATIONS, unit=unit).result
    assert f"only {len(clusters)} {unit} clusters: the intervals are rough" in result["caveats"]
    assert result["params"]["unit"] == unit
    # Clustering changes the intervals, never the point: 4 misses (1 day or more apart) = 4 · 1260.
    assert result["summary"]["projected_cost"] == "0.00504"


def test_an_unknown_unit_is_refused() -> None:
    with pytest.raises(ReplayError, match="unit must be one of"):
        simulate([], proposal(BASE_POLICY), "week")


@pytest.mark.parametrize("order", [
    [("r1", T0 + timedelta(seconds=1)), ("r2", T0)],  # ts goes backwards
    [("r2", T0), ("r1", T0)],  # same ts, ids out of order
])
def test_an_out_of_order_log_is_a_clear_error(order: list[tuple[str, datetime]]) -> None:
    log = [logged(rid, ts, CACHED, 1010) for rid, ts in order]
    bad = order[1][0]
    with pytest.raises(ReplayError, match=rf"request {bad} is out of \(ts, id\) order"):
        simulate(log, proposal(BASE_POLICY))


def test_nothing_to_replay_is_a_clear_error() -> None:
    p = proposal(BASE_POLICY)
    with pytest.raises(ReplayError, match="no 2xx requests with prefix chains"):
        report(simulate([logged("r1", T0, CACHED, 1010, status=500)], p), p)


# --- the proxy's own log, replayed under the proxy's own policy -----------------------------------

SYSTEM = words("sys", 20)
USER = [words("first", 10), words("second", 10), words("third", 10)]


def explicit_turns() -> list[list[dict[str, Any]]]:
    """An agent's turns: a 1h-marked system prompt, history, the new user message marked 5m."""
    system = {"role": "system", "content": [text(SYSTEM, "1h")]}
    turns: list[list[dict[str, Any]]] = []
    history: list[dict[str, Any]] = []
    for user in USER:
        turns.append([system, *history, {"role": "user", "content": [text(user, "5m")]}])
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": REPLY}]
    return turns


def plain_turns() -> list[list[dict[str, Any]]]:
    """The same conversation without a single marker (for the policy's automatic placement)."""
    turns: list[list[dict[str, Any]]] = []
    history: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    for user in USER[:2]:
        turns.append([*history, {"role": "user", "content": user}])
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": REPLY}]
    return turns


async def send(client: openai.AsyncOpenAI, syntax: str, model: str, messages: list[dict[str, Any]]) -> None:
    """One turn, its markers as ``cache_control`` or OpenAI's own, over Chat Completions or the Responses API (the
    request tier ``in_memory`` is the policy's default, 5m, for OpenAI breakpoints that name none)."""
    if syntax == "cache_control":
        await client.chat.completions.create(model=model, messages=cast(Any, messages))
    elif syntax == "openai-breakpoints":
        await client.chat.completions.create(model=model, messages=with_openai_breakpoints(messages),
                                             prompt_cache_retention="in_memory")
    else:
        await client.responses.create(model=model, input=as_responses_input(messages),
                                      prompt_cache_retention="in_memory")


@pytest.mark.parametrize("syntax", ["cache_control", "openai-breakpoints", "responses"])
async def test_replaying_the_proxys_log_under_its_own_policy_gives_back_what_it_billed(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path, syntax: str) -> None:
    """Recorded through Chat Completions with ``cache_control``, with OpenAI's breakpoints, or through the Responses
    API: the same log, and replay gives back what was billed."""
    url, _ = simulator
    explicit, automatic = unique("replay-explicit"), unique("replay-auto")
    apis = ["openai", "openai-responses"]
    config = {"models": [
        model_config(explicit, url + "/v1", apis, word_tokenizer),
        model_config(automatic, url + "/v1", apis, word_tokenizer,
                     automatic={"mode": "lastUserMessage", "ttl": "1h"}),
    ]}
    specs = {m["alias"]: m["cache"] for m in config["models"]}
    turns, plain = explicit_turns(), plain_turns()
    # Per principal, in order: (model, messages). With the word tokenizer (see test_proxy_billing):
    #   acme, explicit: turn 1 writes 1h 20 + 5m 10; turns 2 and 3 read the previous user prefix and write 5m 18.
    #   globex, explicit: turn 3 cold (writes 1h 20, 5m 46), then "hello there" marked 5m: a 2-token
    #     prefix, under minPrefixTokens 10, so nothing is read or written.
    #   initech, explicit: turn 1 twice: the second reads the 30-token 5m prefix.
    #   acme and globex, automatic (lastUserMessage at 1h, no markers sent): acme's turn 1 writes 1h 30,
    #     turn 2 reads it and writes 1h 18; globex's turn 1 writes 1h 30.
    short = [{"role": "user", "content": [text("hello there", "5m")]}]
    script: dict[str, list[tuple[str, list[dict[str, Any]]]]] = {
        "acme": [(explicit, t) for t in turns] + [(automatic, t) for t in plain],
        "globex": [(explicit, turns[2]), (explicit, short), (automatic, plain[0])],
        "initech": [(explicit, turns[0]), (explicit, turns[0])],
    }
    async with running_proxy(config, tmp_path, pg_dsn) as proxy:
        clients = {name: openai.AsyncOpenAI(base_url=proxy.url + "/v1", max_retries=0,
                                            api_key=await new_key(pg_dsn, unique(name)))
                   for name in script}
        for step in range(max(len(s) for s in script.values())):  # interleave the principals
            for name, steps in script.items():
                if step < len(steps):
                    model, messages = steps[step]
                    await send(clients[name], syntax, model, messages)
                    await settle(proxy)

    conn = await asyncpg.connect(pg_dsn)
    try:
        for model, sent in ((explicit, 7), (automatic, 3)):
            log = [r async for r in export_rows(conn, models=[model])]
            ledger = await conn.fetchrow(
                "SELECT count(*) AS n, sum(cost) AS cost, sum(prompt_tokens) AS prompt, sum(read_tokens) AS read,"
                " count(*) FILTER (WHERE read_tokens > 0) AS hits, sum(creation_5m) AS c5m,"
                " sum(creation_1h) AS c1h, sum(creation_24h) AS c24h,"
                " count(*) FILTER (WHERE read_tokens = 0 AND creation_5m + creation_1h = 0) AS uncached"
                " FROM ledger WHERE virtual_model = $1", model)
            assert ledger is not None and ledger["n"] == len(log) == sent
            # The proxy billed the splits worked out above (prompt = words + 3 per message):
            #   explicit: reads 30 + 48 (acme) + 30 (initech) = 108 in 3 requests; 5m 10 + 18 + 18 + 46 + 10 = 102;
            #     1h 20 · 3 = 60; prompts 36 + 60 + 84 + 84 + (2 + 3) + 36 + 36 = 341; one request uncached.
            #   automatic: one read of 30; 1h 30 + 18 + 30 = 78; prompts 36 + 60 + 36 = 132.
            expected = (341, 108, 3, 102, 60, 1) if model == explicit else (132, 30, 1, 0, 78, 0)
            assert tuple(ledger[k] for k in ("prompt", "read", "hits", "c5m", "c1h", "uncached")) == expected

            # The log carries the tiers the proxy classified with, the policy's automatic markers included.
            spec = specs[model]
            p = Proposal(CachePolicy.from_spec(spec), spec)
            result = report(simulate(log, p), p, seed=0, iterations=ITERATIONS).result
            s = result["summary"]
            assert s["requests"] == sent
            assert Decimal(s["baseline_cost"]) == ledger["cost"]  # the ledger's costs have ≤ 8 places
            assert s["projected_cost"] == s["baseline_cost"], (model, s)
            assert (s["savings"], s["savings_pct"]) == ("0", "0.0000")
            # Same read/creation split as billed: the ratios and the per-tier creation cost (3.00 in).
            assert s["read_token_ratio"] == str((Decimal(ledger["read"]) / ledger["prompt"]).quantize(Decimal("1e-6")))
            assert s["hit_rate"] == str((Decimal(ledger["hits"]) / ledger["n"]).quantize(Decimal("1e-6")))
            multipliers = CachePolicy.from_spec(spec).write_multipliers
            for tier in TIERS:
                assert Decimal(s["creation_cost"][tier]) == ledger[f"c{tier}"] * 3 * multipliers[tier] / MILLION
            [per_model] = result["per_model"]
            assert per_model == {"model": model, **s}
    finally:
        await conn.close()


# --- determinism and intervals over a synthetic log -----------------------------------------------

SYNTHETIC_POLICY: dict[str, Any] = {
    "minPrefixTokens": 256, "writeMultipliers": {"5m": "1.25", "1h": "2"}, "readMultiplier": "0.1",
    "automatic": {"mode": "lastUserMessage", "ttl": "5m"},
}
SYNTHETIC_OVERRIDE = {"5m": "1h"}


def synthetic_log(principals: int = 40, seed: int = 1) -> list[LoggedRequest]:
    """Agent conversations over three days: a 1h-marked system prompt, turns at varied gaps (some past
    5m, a few past 1h), some principals marking their last user message 5m, the rest leaving it to the
    policy; recorded without caching at varied prices."""
    rng = random.Random(seed)
    log: list[LoggedRequest] = []
    for p in range(principals):
        principal = f"principal-{p:02d}"
        ts = T0 + timedelta(minutes=rng.randrange(3 * 24 * 60))
        system = blk(f"{p}-sys", rng.randrange(300, 4000), "1h", "system")
        marks_user = rng.random() < 0.5
        history: list[ChainBlock] = [system]
        price = rng.choice(["0.5", "3", "15"])
        for turn in range(rng.randrange(1, 9)):
            tokens = history[-1].tokens + rng.randrange(20, 800)
            user = blk(f"{p}-u{turn}", tokens, "5m" if marks_user else None)
            chain = [*history, user]
            prompt = tokens + 3 * len(chain)
            log.append(logged(f"{principal}-t{turn}", ts, chain, prompt, completion=rng.randrange(10, 400),
                              principal=principal, input_per_mtok=price, output_per_mtok=price))
            reply = blk(f"{p}-a{turn}", tokens + rng.randrange(10, 400), None, "assistant")
            history = [*history, ChainBlock(user.hash, user.tokens, "user", None), reply]
            ts += rng.choice([timedelta(seconds=30), timedelta(minutes=2), timedelta(minutes=4),
                              timedelta(minutes=7), timedelta(minutes=40), timedelta(hours=2)])
    return sorted(log, key=lambda r: (r.ts, r.id))


REPLAY_SCRIPT = """
import json, sys
from promptcache.operator.replay.engine import canonical, report, simulate
from promptcache.operator.replay.proposal import Proposal
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.storage.requestlog import read_jsonl

log, spec, override, seed, out = sys.argv[1:]
spec, override = json.loads(spec), json.loads(override)
proposal = Proposal(CachePolicy.from_spec(spec), spec, override)
result = report(simulate(read_jsonl(log), proposal), proposal, seed=int(seed), iterations=2000).result
with open(out, "w", encoding="utf-8") as f:
    f.write(canonical(result))
"""


def test_same_input_and_seed_give_byte_identical_results_across_processes(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("".join(to_json_line(r) + "\n" for r in synthetic_log()), encoding="utf-8")
    script = tmp_path / "replay_once.py"
    script.write_text(REPLAY_SCRIPT, encoding="utf-8")
    runs = {"a": ("7", "1"), "b": ("7", "2"), "c": ("8", "3")}  # name: (seed, PYTHONHASHSEED)
    processes = [
        subprocess.Popen(
            [sys.executable, "-P", str(script), str(log), json.dumps(SYNTHETIC_POLICY), json.dumps(SYNTHETIC_OVERRIDE),
             seed, str(tmp_path / f"{name}.json")],
            cwd=tmp_path, env={"PYTHONHASHSEED": hashseed, "PATH": "/usr/bin:/bin"})
        for name, (seed, hashseed) in runs.items()
    ]
    assert [p.wait(timeout=60) for p in processes] == [0, 0, 0]
    a, b, c = ((tmp_path / f"{name}.json").read_bytes() for name in runs)
    assert a == b
    first, other = json.loads(a), json.loads(c)
    # The digest is the SHA-256 of the canonical JSON of everything else.
    for result in (first, other):
        rest = {k: v for k, v in result.items() if k != "digest"}
        assert result["digest"] == hashlib.sha256(canonical(rest).encode()).hexdigest()
    # In this process, too: the same bytes.
    p = proposal(SYNTHETIC_POLICY, SYNTHETIC_OVERRIDE)
    assert canonical(report(simulate(synthetic_log(), p), p, seed=7, iterations=2000).result).encode() == a
    # Another seed: another digest, other intervals, the same point estimates.
    assert other["digest"] != first["digest"]
    assert other["intervals"] != first["intervals"]
    assert other["summary"] == first["summary"]


def test_every_point_estimate_lies_within_its_interval() -> None:
    p = proposal(SYNTHETIC_POLICY, SYNTHETIC_OVERRIDE)
    result = report(simulate(synthetic_log(), p), p, seed=3, iterations=2000).result
    s = result["summary"]
    assert s["requests"] > 100 and 0 < Decimal(s["hit_rate"]) < 1 and Decimal(s["savings"]) > 0
    assert set(result["intervals"]) == {"projected_cost", "savings", "savings_pct", "hit_rate", "read_token_ratio"}
    for name, bounds in result["intervals"].items():
        assert isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, str) for b in bounds)
        lo, hi = map(Decimal, bounds)
        assert lo < Decimal(s[name]) < hi, (name, lo, s[name], hi)
    assert not any("clusters" in caveat for caveat in result["caveats"])  # 40 principals


def test_one_cluster_gives_a_caveat_and_collapsed_intervals() -> None:
    log = [r for r in synthetic_log() if r.principal == "principal-00"]
    p = proposal(SYNTHETIC_POLICY, SYNTHETIC_OVERRIDE)
    result = report(simulate(log, p), p, seed=3, iterations=ITERATIONS).result
    assert "only 1 principal clusters: the intervals are rough" in result["caveats"]
    # Every resample is that one cluster: each interval is the point, give or take the last place. (Savings
    # here are exactly 0.000678875 but a float 0.00067887499…: nearest rounding put the interval at
    # 0.00067887, outside the point 0.00067888; interval ends are rounded outwards for that reason.)
    quantum = {"projected_cost": "1e-8", "savings": "1e-8", "savings_pct": "1e-4", "hit_rate": "1e-6",
               "read_token_ratio": "1e-6"}
    for name, bounds in result["intervals"].items():
        lo, hi = map(Decimal, bounds)
        point, step = Decimal(result["summary"][name]), Decimal(quantum[name])
        assert point - step <= lo <= point <= hi <= point + step, (name, lo, point, hi)


# --- why requests missed (docs/design.md#miss-reasons) --------------------------------------------


def test_each_miss_has_its_reason_under_the_recording_and_the_proposal() -> None:
    """One principal (one scope) per reason, by hand; the recording cached nothing but for ``rec``, whose
    recorded splits say it wrote its system prompt, missed it after 6 minutes, and read it a minute later."""
    policy = {"minPrefixTokens": 100, "maxBreakpoints": 1, "lookbackBlocks": 2}
    m = timedelta(minutes=1)
    a_chain = [blk("a", 500, None, "system"), blk("b", 1000, "5m"), blk("qa", 1010)]
    b_chain = [blk("a", 500, None, "system"), blk("c", 1000, "5m"), blk("qb", 1010)]
    far = [blk("sys", 1000), blk("m1", 1100), blk("m2", 1200), blk("z", 1300, "5m"), blk("qz", 1310)]
    scenarios: dict[str, list[tuple[timedelta, list[ChainBlock]]]] = {
        "new": [(0 * m, CACHED)],
        "exp": [(0 * m, CACHED), (6 * m, CACHED)],  # expired a minute ago
        "old": [(0 * m, CACHED), (2 * 24 * 60 * m, CACHED)],  # expired two days ago: beyond the horizon
        "chg": [(0 * m, a_chain), (1 * m, b_chain)],  # the same start, another block at the breakpoint
        "min": [(0 * m, [blk("t", 50, "5m"), blk("q", 60)])],
        "unm": [(0 * m, [blk("x", 1000), blk("y", 1010)])],
        "rej": [(0 * m, [blk("s1", 1000, "5m"), blk("s2", 1200, "5m"), blk("q", 1210)])],
        "look": [(0 * m, CACHED), (1 * m, far)],  # sys is cached, but 3 blocks before the breakpoint
        "rec": [(0 * m, CACHED), (6 * m, CACHED), (7 * m, CACHED)],
    }
    log = [logged(f"{who}-{n}", T0 + at, chain, chain[-1].tokens, principal=who)
           for who, turns in scenarios.items() for n, (at, chain) in enumerate(turns)]
    recorded = {"rec-0": (0, 1000), "rec-1": (0, 1000), "rec-2": (1000, 0)}  # (read, 5m creation)
    log = [msgspec.structs.replace(r, read_tokens=recorded[r.id][0], creation_tokens={
        **r.creation_tokens, "5m": recorded[r.id][1]}) if r.id in recorded else r for r in log]
    result = replay(sorted(log, key=lambda r: (r.ts, r.id)), policy)
    assert result["summary"]["requests"] == 15
    assert result["summary"]["misses"] == {
        "recorded": misses(unmarked=1, below_minimum=11, never_written=1, expired=1),
        "projected": misses(rejected=1, unmarked=1, below_minimum=1, expired=2, beyond_lookback=1,
                            prefix_changed=1, never_written=7),
    }
    assert result["per_model"][0]["misses"] == result["summary"]["misses"]
