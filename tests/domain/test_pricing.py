"""docs/design.md#billing: exact Decimal costs, list price, the two caps of reconcile, and tariff versions."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from promptcache.proxy.domain.classify import NO_CACHE, Classification, Read
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.pricing import Split, Tariff, cost, list_cost, reconcile, tariff_at
from promptcache.proxy.domain.tiers import TIERS

from support.builders import T0, h

D = Decimal
DEFAULT = CachePolicy()
CUSTOM = CachePolicy.from_spec(
    {"writeMultipliers": {"5m": "1.5", "1h": "3", "24h": "4"}, "readMultiplier": "0.05"}
)


def tariff(inp: str, out: str, policy: CachePolicy = DEFAULT) -> Tariff:
    return Tariff.for_policy("m", D(inp), D(out), policy)


def creation(m5: int = 0, h1: int = 0, d24: int = 0) -> dict[str, int]:
    return {"5m": m5, "1h": h1, "24h": d24}


def classification(read: int, m5: int = 0, h1: int = 0, d24: int = 0) -> Classification:
    r = Read(0, h(0), read, "5m", T0) if read else None
    return Classification(r, (), creation(m5, h1, d24))


# Every expected cost below is worked out by hand (USD per million tokens).
COST_TABLE = [
    # 2000·3 + 6000·3·0.1 + 2000·3·1.25 + 500·15 = 6000 + 1800 + 7500 + 7500 = 22800 → 0.0228
    pytest.param(tariff("3.00", "15.00"), Split(10_000, 500, 6_000, creation(m5=2_000)), "0.0228", id="5m"),
    # 2000·3 + 8000·3·2.0 = 6000 + 48000 = 54000 → 0.054 (no completion)
    pytest.param(
        tariff("3.00", "15.00"), Split(10_000, 0, 0, creation(h1=8_000)), "0.054", id="1h-no-completion"
    ),
    # uncached 15000·3 = 45000; read 20000·3·0.1 = 6000; 24h 10000·3·2.5 = 75000;
    # 5m 5000·3·1.25 = 18750; completion 1000·15 = 15000 → 159750 → 0.15975
    pytest.param(
        tariff("3.00", "15.00"),
        Split(50_000, 1_000, 20_000, creation(m5=5_000, d24=10_000)),
        "0.15975",
        id="24h-and-5m",
    ),
    # all read: 4096·3·0.1 = 1228.8 → 0.0012288
    pytest.param(tariff("3.00", "15.00"), Split(4_096, 0, 4_096), "0.0012288", id="all-read"),
    # custom multipliers, input 0.80, output 4.00: uncached 4000·0.8 = 3200; read 10000·0.8·0.05 = 400;
    # 5m 4000·0.8·1.5 = 4800; 1h 2000·0.8·3 = 4800; completion 300·4 = 1200 → 14400 → 0.0144
    pytest.param(
        tariff("0.80", "4.00", CUSTOM),
        Split(20_000, 300, 10_000, creation(m5=4_000, h1=2_000)),
        "0.0144",
        id="custom-multipliers",
    ),
    # custom 24h: 1000·0.8·4 = 3200 → 0.0032
    pytest.param(
        tariff("0.80", "4.00", CUSTOM), Split(1_000, 0, 0, creation(d24=1_000)), "0.0032", id="custom-24h"
    ),
    # no cache: 1234·0.15 = 185.1; 567·0.60 = 340.2 → 525.3 → 0.0005253
    pytest.param(tariff("0.15", "0.60"), Split(1_234, 567), "0.0005253", id="no-cache"),
    # one token of each kind at 1/MTok: 1 + 0.1 + 1.25 + 2 + 2.5 + out 2 = 8.85 → 0.00000885
    pytest.param(tariff("1", "2"), Split(5, 1, 1, creation(1, 1, 1)), "0.00000885", id="one-of-each"),
    # nothing at all
    pytest.param(tariff("3.00", "15.00"), Split(0, 0), "0", id="empty"),
]


@pytest.mark.parametrize(("t", "split", "expected"), COST_TABLE)
def test_cost_table(t: Tariff, split: Split, expected: str) -> None:
    result = cost(split, t)
    assert isinstance(result, Decimal)
    assert result == D(expected)


def test_free_reads_and_free_writes() -> None:
    policy = CachePolicy.from_spec({"writeMultipliers": {"5m": 0}, "readMultiplier": 0})
    # uncached 1000·2 = 2000, read free, 5m creation free, completion 100·10 = 1000 → 3000 → 0.003
    assert cost(Split(5_000, 100, 3_000, creation(m5=1_000)), tariff("2", "10", policy)) == D("0.003")


@pytest.mark.parametrize(
    ("t", "prompt", "completion", "expected"),
    [
        (tariff("3.00", "15.00"), 10_000, 500, "0.0375"),  # 30000 + 7500
        (tariff("0.15", "0.60"), 1_234, 567, "0.0005253"),  # 185.1 + 340.2
        (tariff("3.00", "15.00"), 0, 0, "0"),
        (tariff("2.5", "10"), 1_000_000, 1_000_000, "12.5"),
    ],
)
def test_list_price(t: Tariff, prompt: int, completion: int, expected: str) -> None:
    # The cache split does not change the list price.
    assert list_cost(Split(prompt, completion), t) == D(expected)
    assert list_cost(Split(prompt, completion, prompt // 2, creation(m5=prompt // 4)), t) == D(expected)


def test_money_is_never_float() -> None:
    # 0.1 has no exact binary representation; Decimal keeps 1·0.1·0.1 / 10⁶ exact.
    result = cost(Split(1, 0, 1), tariff("0.1", "0"))
    assert result == D("0.00000001")
    assert result * 3 == D("0.00000003")


# --- reconcile -------------------------------------------------------------------------------


def test_reconcile_passes_a_fitting_split_through() -> None:
    split = reconcile(10_000, 500, classification(6_000, m5=2_000))
    assert split == Split(10_000, 500, 6_000, creation(m5=2_000))
    assert (split.uncached, split.cache_valid) == (2_000, True)
    assert cost(split, tariff("3.00", "15.00")) == D("0.0228")


def test_a_split_over_the_prompt_is_scaled_in_proportion_never_list_price() -> None:
    # Ours 9,000 against the engine's 8,000 (12.5 % over): every part times 8/9, the last token to the largest
    # remainder: 6000·8/9 = 5333.3, 3000·8/9 = 2666.7 → 5333 + 2667 = 8000.
    split = reconcile(8_000, 10, classification(6_000, m5=3_000))
    assert (split.read, dict(split.creation), split.uncached, split.cache_valid) == (
        5_333, creation(m5=2_667), 0, True)
    # 5333·3·0.1 + 2667·3·1.25 + 10·15 = 1599.9 + 10001.25 + 150 = 11751.15 → 0.01175115
    assert cost(split, tariff("3.00", "15.00")) == D("0.01175115")


def test_a_one_percent_overcount_keeps_the_discount() -> None:
    """The field bug this rule exists for: per-block counts about 1 % above the engine's prompt_tokens."""
    split = reconcile(10_000, 0, classification(0, m5=1_010, h1=9_090))
    assert (split.read, dict(split.creation), split.uncached, split.cache_valid) == (
        0, creation(m5=1_000, h1=9_000), 0, True)


def test_creation_the_whole_prompt_shares_it_with_the_read() -> None:
    # 3,500 of ours in 3,000: 500·6/7 = 428 r 2000, 3000·6/7 = 2571 r 1500; the spare token to the read's remainder.
    split = reconcile(3_000, 0, classification(500, h1=3_000))
    assert (split.read, split.creation_tokens, split.uncached, split.cache_valid) == (429, 2_571, 0, True)
    exact = reconcile(3_000, 0, classification(0, h1=3_000))
    assert (exact.read, exact.creation_tokens, exact.uncached, exact.cache_valid) == (0, 3_000, 0, True)


def test_an_overcount_beyond_a_quarter_is_not_the_engines_tokenizer() -> None:
    split = reconcile(8_000, 500, classification(1_000, m5=5_000, h1=4_001))  # 10,001 > 8,000 · 5/4
    assert split == Split(8_000, 500, 0, creation(), cache_valid=False)
    t = tariff("3.00", "15.00")
    assert cost(split, t) == list_cost(split, t) == D("0.0315")  # 24000 + 7500
    assert reconcile(8_000, 500, classification(1_000, m5=5_000, h1=4_000)).cache_valid  # exactly 5/4: fitted


@given(prompt=st.integers(0, 10**7), read=st.integers(0, 10**7),
       tiers=st.fixed_dictionaries({t: st.integers(0, 10**7) for t in TIERS}))
def test_every_split_fits_the_prompt(prompt: int, read: int, tiers: dict[str, int]) -> None:
    c = Classification(Read(0, h(0), read, "5m", T0) if read else None, (), tiers)
    split = reconcile(prompt, 7, c)
    ours = read + sum(tiers.values())
    assert split.read + split.creation_tokens <= prompt and split.uncached >= 0
    assert (split.prompt, split.completion) == (prompt, 7)
    if ours <= prompt:
        assert (split.read, dict(split.creation), split.cache_valid, split.scaled) == (read, tiers, True, False)
    elif ours * 4 <= prompt * 5:
        assert split.cache_valid and split.scaled and split.read + split.creation_tokens == prompt
        for part, fitted in zip([read, *tiers.values()], [split.read, *split.creation.values()], strict=True):
            assert part * prompt // ours <= fitted <= part * prompt // ours + 1 and fitted <= part
    else:
        assert split == Split(prompt, 7, cache_valid=False)


def test_negative_creation_is_corrupt() -> None:
    split = reconcile(8_000, 0, classification(0, m5=-1, h1=2))
    assert (split.read, split.creation_tokens, split.cache_valid) == (0, 0, False)


def test_no_classification_is_list_price() -> None:
    split = reconcile(10_000, 500, None)
    assert (split.read, dict(split.creation), split.uncached) == (0, creation(), 10_000)
    assert cost(split, tariff("3.00", "15.00")) == D("0.0375")
    assert reconcile(10_000, 500, NO_CACHE) == Split(10_000, 500, 0, creation())


# --- tariff versions -------------------------------------------------------------------------

V1_END = T0 + timedelta(days=10)
V1 = Tariff(
    "m", D("3"), D("15"), DEFAULT.write_multipliers, D("0.1"), version=1, valid_from=T0, valid_until=V1_END
)
V2 = Tariff("m", D("2"), D("10"), DEFAULT.write_multipliers, D("0.1"), version=2, valid_from=V1_END)


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (T0 - timedelta(seconds=1), None),
        (T0, V1),
        (V1_END - timedelta(microseconds=1), V1),
        (V1_END, V2),  # a request starting exactly at v1's valid_until uses v2
        (V1_END + timedelta(days=365), V2),
    ],
)
def test_tariff_at_uses_the_version_active_when_the_request_started(
    at: object, expected: Tariff | None
) -> None:
    assert tariff_at([V2, V1], at) == expected  # type: ignore[arg-type]
    assert tariff_at([V1, V2], at) == expected  # type: ignore[arg-type]


def test_valid_until_is_exclusive() -> None:
    assert V1.in_force(V1_END - timedelta(microseconds=1))
    assert not V1.in_force(V1_END)
    assert V2.in_force(V1_END)
    assert tariff_at([V1], V1_END) is None


def test_tariff_at_without_versions_and_unbounded_tariffs() -> None:
    assert tariff_at([], T0) is None
    unbounded = tariff("3", "15")
    assert tariff_at([unbounded], T0) is unbounded
    assert tariff_at([unbounded, V1], T0 + timedelta(days=1)) is V1


def test_tariff_for_policy_and_same_prices() -> None:
    t = tariff("3.00", "15.00", CUSTOM)
    assert (t.write_multipliers["24h"], t.read_multiplier) == (D("4"), D("0.05"))
    assert t.same_prices(tariff("3", "15.0", CUSTOM))
    assert not t.same_prices(tariff("3.00", "15.00"))
    assert not t.same_prices(tariff("3.01", "15.00", CUSTOM))
    assert not t.same_prices(tariff("3.00", "15.01", CUSTOM))


# --- the integer formula is the Decimal formula --------------------------------------------------


def _decimal_formula(split: Split, t: Tariff) -> tuple[Decimal, Decimal]:
    """cost and list_cost as the cost formula writes them (docs/design.md#cost-formula), in Decimal arithmetic."""
    inp = t.input_per_mtok
    total = D(split.uncached) * inp + D(split.read) * inp * t.read_multiplier
    for tier, tokens in split.creation.items():
        total += D(tokens) * inp * t.write_multipliers[tier]
    total += D(split.completion) * t.output_per_mtok
    return total / D(1_000_000), (D(split.prompt) * inp + D(split.completion) * t.output_per_mtok) / D(1_000_000)


_money = st.one_of(st.integers(0, 40).map(D), st.decimals(0, 1000, allow_nan=False, allow_infinity=False, places=4),
                   st.sampled_from([D("3.00"), D("0.10"), D("1E+1"), D("2.50"), D(0)]))


@given(inp=_money, out=_money, writes=st.tuples(_money, _money, _money), read_multiplier=_money,
       prompt=st.integers(0, 10**8), completion=st.integers(0, 10**6), shares=st.lists(st.floats(0, 1), min_size=4,
                                                                                      max_size=4))
def test_cost_is_the_decimal_formula_digit_for_digit(inp: Decimal, out: Decimal, writes: tuple[Decimal, ...],
                                                     read_multiplier: Decimal, prompt: int, completion: int,
                                                     shares: list[float]) -> None:
    """The bill (replay's integers) equals the formula's Decimal, value and exponent: the ledger and logs print it."""
    t = Tariff("m", inp, out, dict(zip(TIERS, writes, strict=True)), read_multiplier)
    read = int(prompt * shares[0])
    left = prompt - read
    split_creation = {}
    for tier, share in zip(TIERS, shares[1:], strict=True):
        split_creation[tier] = int(left * share)
        left -= split_creation[tier]
    split = Split(prompt, completion, read, split_creation)
    expected_cost, expected_list = _decimal_formula(split, t)
    assert cost(split, t).as_tuple() == expected_cost.as_tuple()
    assert list_cost(split, t).as_tuple() == expected_list.as_tuple()
    rates = t.rates
    assert rates.cost(split) / rates.scale == float(expected_cost)
