"""Cache policy parsing: defaults, camelCase keys, and errors that name the offending key."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from promptcache.proxy.domain.policy import CachePolicy, PolicyError, parse_decimal

D = Decimal


def test_defaults() -> None:
    policy = CachePolicy.from_spec(None)
    assert policy == CachePolicy.from_spec({})
    assert policy.enabled_ttls == ("5m", "1h", "24h")
    assert policy.default_ttl == "5m"
    assert dict(policy.write_multipliers) == {"5m": D("1.25"), "1h": D("2.0"), "24h": D("2.5")}
    assert policy.read_multiplier == D("0.1")
    assert (policy.min_prefix_tokens, policy.max_breakpoints, policy.lookback_blocks) == (1024, 4, 20)
    assert (policy.automatic_mode, policy.automatic_ttl) == ("off", None)
    assert policy.ignore_prefixes == ()
    assert CachePolicy() == policy


def test_camel_case_keys() -> None:
    policy = CachePolicy.from_spec(
        {
            "enabledTtls": ["1h", "5m", "1h"],
            "defaultTtl": "1h",
            "writeMultipliers": {"5m": "1.5"},
            "readMultiplier": "0.05",
            "minPrefixTokens": 2048,
            "maxBreakpoints": 2,
            "lookbackBlocks": 8,
            "automatic": {"mode": "lastUserMessage", "ttl": "5m"},
            "ignorePrefixes": ["x-nonce:", "x-billing:"],
        }
    )
    assert policy == CachePolicy(
        enabled_ttls=("5m", "1h"),
        default_ttl="1h",
        write_multipliers={"5m": D("1.5"), "1h": D("2.0"), "24h": D("2.5")},
        read_multiplier=D("0.05"),
        min_prefix_tokens=2048,
        max_breakpoints=2,
        lookback_blocks=8,
        automatic_mode="lastUserMessage",
        automatic_ttl="5m",
        ignore_prefixes=("x-nonce:", "x-billing:"),
    )


def test_default_ttl_follows_enabled_tiers() -> None:
    assert CachePolicy.from_spec({"enabledTtls": ["24h", "1h"]}).default_ttl == "1h"
    assert CachePolicy.from_spec({"enabledTtls": ["24h"]}).default_ttl == "24h"


def test_automatic_ttl_defaults_to_default_ttl_and_off_clears_it() -> None:
    assert (
        CachePolicy.from_spec({"defaultTtl": "1h", "automatic": {"mode": "lastBlock"}}).automatic_ttl == "1h"
    )
    assert CachePolicy.from_spec({"automatic": {"mode": "off", "ttl": "1h"}}).automatic_ttl is None
    assert CachePolicy.from_spec({"automatic": None}).automatic_mode == "off"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0.1", "0.1"), (0.1, "0.1"), (2, "2"), ("0", "0"), (0, "0"), ("99.999", "99.999"), (D("1.25"), "1.25")],
)
def test_multiplier_forms(value: Any, expected: str) -> None:
    policy = CachePolicy.from_spec({"readMultiplier": value, "writeMultipliers": {"1h": value}})
    assert policy.read_multiplier == D(expected)
    assert policy.write_multipliers["1h"] == D(expected)
    assert str(policy.read_multiplier) == expected  # a YAML float 0.1 is not 0.1000000000000000055…


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        (["5m"], "cache policy"),
        ({"enabledTtls": ["1h"], "defaultTtl": "5m"}, "defaultTtl"),
        ({"defaultTtl": "2h"}, "defaultTtl"),
        ({"defaultTtl": None}, "defaultTtl"),
        ({"enabledTtls": ["5m", "2h"]}, "enabledTtls"),
        ({"enabledTtls": []}, "enabledTtls"),
        ({"enabledTtls": "5m"}, "enabledTtls"),
        ({"enabledTtls": [5]}, "enabledTtls"),
        ({"writeMultipliers": {"2h": "1.0"}}, "writeMultipliers"),
        ({"writeMultipliers": "1.25"}, "writeMultipliers"),
        ({"writeMultipliers": {"5m": "100"}}, "writeMultipliers.5m"),
        ({"writeMultipliers": {"1h": -1}}, "writeMultipliers.1h"),
        ({"writeMultipliers": {"24h": True}}, "writeMultipliers.24h"),
        ({"writeMultipliers": {"24h": None}}, "writeMultipliers.24h"),
        ({"readMultiplier": 100}, "readMultiplier"),
        ({"readMultiplier": "100.0"}, "readMultiplier"),
        ({"readMultiplier": "-0.01"}, "readMultiplier"),
        ({"readMultiplier": True}, "readMultiplier"),
        ({"readMultiplier": False}, "readMultiplier"),
        ({"readMultiplier": "ten percent"}, "readMultiplier"),
        ({"readMultiplier": float("nan")}, "readMultiplier"),
        ({"readMultiplier": float("inf")}, "readMultiplier"),
        ({"readMultiplier": "Infinity"}, "readMultiplier"),
        ({"readMultiplier": [0.1]}, "readMultiplier"),
        ({"minPrefixTokens": 1.5}, "minPrefixTokens"),
        ({"minPrefixTokens": 1024.0}, "minPrefixTokens"),
        ({"minPrefixTokens": "1024"}, "minPrefixTokens"),
        ({"minPrefixTokens": True}, "minPrefixTokens"),
        ({"minPrefixTokens": -1}, "minPrefixTokens"),
        ({"maxBreakpoints": 0}, "maxBreakpoints"),
        ({"maxBreakpoints": False}, "maxBreakpoints"),
        ({"lookbackBlocks": 0}, "lookbackBlocks"),
        ({"lookbackBlocks": None}, "lookbackBlocks"),
        ({"automatic": {"mode": "always"}}, "automatic.mode"),
        ({"automatic": {"mode": "lastblock"}}, "automatic.mode"),
        ({"automatic": "lastBlock"}, "automatic"),
        ({"automatic": {"mode": "lastBlock", "ttl": "2h"}}, "automatic.ttl"),
        ({"enabledTtls": ["5m"], "automatic": {"mode": "lastBlock", "ttl": "24h"}}, "automatic.ttl"),
        ({"ignorePrefixes": "x-nonce:"}, "ignorePrefixes"),
        ({"ignorePrefixes": [""]}, "ignorePrefixes"),
        ({"ignorePrefixes": ["ok", 1]}, "ignorePrefixes"),
        ({"ignorePrefixes": {"x": 1}}, "ignorePrefixes"),
    ],
)
def test_policy_errors_name_the_key(spec: Any, key: str) -> None:
    with pytest.raises(PolicyError) as err:
        CachePolicy.from_spec(spec)
    assert str(err.value).startswith(f"{key} ")


def test_boundaries_of_integer_limits_are_accepted() -> None:
    policy = CachePolicy.from_spec({"minPrefixTokens": 0, "maxBreakpoints": 1, "lookbackBlocks": 1})
    assert (policy.min_prefix_tokens, policy.max_breakpoints, policy.lookback_blocks) == (0, 1, 1)


def test_parse_decimal() -> None:
    assert parse_decimal("3.00", "inputPerMTok") == D("3.00")
    assert parse_decimal(15, "outputPerMTok") == D("15")
    assert parse_decimal(0.15, "inputPerMTok") == D("0.15")
    for junk in (True, None, "", "3,00", "1/2", "NaN", {"v": 1}):
        with pytest.raises(PolicyError, match=r"^inputPerMTok must be"):
            parse_decimal(junk, "inputPerMTok")


def test_unknown_keys_are_rejected_so_typos_do_not_pass_silently() -> None:
    with pytest.raises(PolicyError, match=r"unknown cache policy keys \['default_ttl'\]"):
        CachePolicy.from_spec({"default_ttl": "1h"})
    assert CachePolicy.from_spec({"redis": {"maxMemory": "1gb"}}).default_ttl == "5m"
