"""docs/design.md#billing: the exact cost of a request from its token split and the tariff in force.

Money is :class:`~decimal.Decimal` end to end. The upstream's usage is the truth for token
totals; our split must fit inside it or it is not used at all. The formula is computed once, in
integers (:class:`Rates`): the proxy bills each request with it, and replay, which prices millions
of requests, sums its integers and converts once, so the two cannot disagree by a digit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from functools import cached_property
from types import MappingProxyType

from promptcache.proxy.domain.classify import Classification
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.tiers import TIERS

_ZERO_CREATION: Mapping[str, int] = MappingProxyType({tier: 0 for tier in TIERS})


@dataclass(frozen=True)
class Tariff:
    """One version of a model's prices and multipliers; ``valid_until`` None is the active one."""

    model: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    write_multipliers: Mapping[str, Decimal]
    read_multiplier: Decimal
    version: int = 0
    valid_from: datetime | None = None
    valid_until: datetime | None = None

    @classmethod
    def for_policy(
        cls, model: str, input_per_mtok: Decimal, output_per_mtok: Decimal, policy: CachePolicy
    ) -> Tariff:
        """A not-yet-stored tariff: a model's prices with its policy's multipliers."""
        return cls(model, input_per_mtok, output_per_mtok, policy.write_multipliers, policy.read_multiplier)

    @cached_property
    def rates(self) -> Rates:
        return Rates.of(self)

    def same_prices(self, other: Tariff) -> bool:
        return (
            self.input_per_mtok == other.input_per_mtok
            and self.output_per_mtok == other.output_per_mtok
            and self.read_multiplier == other.read_multiplier
            and all(self.write_multipliers[t] == other.write_multipliers[t] for t in TIERS)
        )

    def in_force(self, at: datetime) -> bool:
        return (self.valid_from is None or self.valid_from <= at) and (
            self.valid_until is None or at < self.valid_until
        )


def tariff_at(tariffs: Sequence[Tariff], at: datetime) -> Tariff | None:
    """The version in force when a request started (the latest one whose window holds ``at``)."""
    matching = [t for t in tariffs if t.in_force(at)]
    return max(matching, key=lambda t: (t.valid_from is not None, t.valid_from or at, t.version), default=None)


@dataclass(frozen=True)
class Split:
    """The billed token split. ``uncached`` is what is left of the prompt after read and creation."""

    prompt: int
    completion: int
    read: int = 0
    creation: Mapping[str, int] = field(default_factory=lambda: _ZERO_CREATION)
    cache_valid: bool = True
    scaled: bool = False
    """Our split exceeded the prompt and was scaled down to fit it (see :func:`reconcile`)."""

    @property
    def creation_tokens(self) -> int:
        return sum(self.creation.values())

    @property
    def uncached(self) -> int:
        return self.prompt - self.read - self.creation_tokens


OVERCOUNT_LIMIT = Fraction(5, 4)
"""How far our count of the cached blocks may exceed the engine's prompt count and still be fitted (25 %): joint
tokenization of a whole prompt differs from the sum of its blocks by a few percent; beyond this the tokenizer is
not the engine's, and the split would be fiction."""


def reconcile(prompt: int, completion: int, classification: Classification | None) -> Split:
    """Fit our split into the upstream's prompt count (docs/design.md#billing-caps).

    No classification (index down, no tokenizer, deadline passed) is list price. A split that fits is billed as
    it is; the rest of the prompt, the chat template's tokens included, is uncached. A split over the prompt by up
    to :data:`OVERCOUNT_LIMIT` is scaled down, every part in proportion, to exactly the prompt; one over by more,
    or with a negative count, is corrupt: list price, zero cache fields, ``cache_valid`` False so nothing is
    written.
    """
    if classification is None:
        return Split(prompt, completion)
    parts = [classification.read_tokens, *classification.creation.values()]
    ours = sum(parts)
    if min(parts) < 0 or ours * OVERCOUNT_LIMIT.denominator > prompt * OVERCOUNT_LIMIT.numerator:
        return Split(prompt, completion, cache_valid=False)
    scaled = ours > prompt
    if scaled:
        parts = _apportion(parts, prompt)
    creation = dict(zip(classification.creation, parts[1:], strict=True))
    return Split(prompt, completion, parts[0], MappingProxyType(creation), scaled=scaled)


def _apportion(parts: Sequence[int], total: int) -> list[int]:
    """``parts`` scaled to sum to exactly ``total`` (< their sum): each floored, the remaining tokens given one each
    to the largest remainders, earlier parts first on ties (Hamilton's method: never above the exact share + 1)."""
    whole = sum(parts)
    shares = [divmod(part * total, whole) for part in parts]
    result = [share for share, _ in shares]
    by_remainder = sorted(range(len(parts)), key=lambda k: (-shares[k][1], k))
    for k in by_remainder[:total - sum(result)]:
        result[k] += 1
    return result


def _coefficient(*factors: Decimal) -> tuple[int, int]:
    """The exact product of ``factors`` as (integer, exponent of ten)."""
    value, exponent = 1, 0
    for factor in factors:
        sign, digits, exp = factor.as_tuple()
        if not isinstance(exp, int):
            raise ValueError(f"prices and multipliers must be finite, got {factor}")
        value *= (-1) ** sign * int("".join(map(str, digits)))
        exponent += exp
    return value, exponent


@dataclass(frozen=True)
class Rates:
    """A tariff as integers over one power of ten, so a request's cost is an exact integer numerator.

    :func:`cost` is ``(uncached·in + read·in·readMult + Σ creation_t·in·writeMult_t + completion·out) / 10⁶``:
    with each coefficient an integer over ``10**k``, it is ``numerator / scale`` with ``scale = 10**(k + 6)``,
    exactly. Numerators sum exactly, and ``numerator / scale`` is the correctly rounded float, the same
    float as ``float(cost(...))``; :func:`list_cost` likewise.
    """

    exponent: int
    scale: int
    input: int
    read: int
    write: Mapping[str, int]
    output: int
    term_exponents: Mapping[str, int]
    """Per term (``input``, ``read``, ``output``, each tier), the exponent Decimal arithmetic gives it."""
    cost_exponent: int
    """The smallest of them: the ideal exponent of :func:`cost` for a split that names every tier."""

    @classmethod
    def of(cls, tariff: Tariff) -> Rates:
        """ValueError for a price or multiplier that is not finite."""
        inp = tariff.input_per_mtok
        terms = {"input": _coefficient(inp), "read": _coefficient(inp, tariff.read_multiplier),
                 "output": _coefficient(tariff.output_per_mtok),
                 **{tier: _coefficient(inp, tariff.write_multipliers[tier]) for tier in TIERS}}
        k = max(0, *(-exp for _, exp in terms.values()))
        scaled = {name: value * 10 ** (exp + k) for name, (value, exp) in terms.items()}
        exponents = {name: exp for name, (_, exp) in terms.items()}
        return cls(k + 6, 10 ** (k + 6), scaled["input"], scaled["read"], {t: scaled[t] for t in TIERS},
                   scaled["output"], exponents, min(exponents.values()))

    def cost(self, split: Split, writes: dict[str, int] | None = None) -> int:
        """:func:`cost` times ``scale``; each tier's cache write share is also added to ``writes``, if given."""
        uncached = split.prompt - split.read
        numerator = split.read * self.read + split.completion * self.output
        for tier, tokens in split.creation.items():
            if tokens:
                written = tokens * self.write[tier]
                numerator += written
                uncached -= tokens
                if writes is not None:
                    writes[tier] += written
        return numerator + uncached * self.input

    def list_cost(self, split: Split) -> int:
        """:func:`list_cost` times ``scale``."""
        return split.prompt * self.input + split.completion * self.output

    def decimal(self, numerator: int, ideal: int | None = None) -> Decimal:
        """``numerator / scale``, exactly; with ``ideal``, in the form Decimal's division gives a quotient of that
        ideal exponent: trailing zeros dropped while the exponent stays at most ``ideal``."""
        digits, exponent = str(numerator), -self.exponent
        if ideal is not None:
            if not numerator:
                return Decimal(f"0E{ideal}")
            drop = min(len(digits) - len(digits.rstrip("0")), ideal - exponent)
            if drop > 0:
                digits, exponent = digits[:-drop], exponent + drop
        return Decimal(f"{digits}E{exponent}")


def cost(split: Split, tariff: Tariff) -> Decimal:
    """(uncached·in + read·in·readMult + Σ creation_t·in·writeMult_t + completion·out) / 10⁶.

    The Decimal that formula gives in Decimal arithmetic, digit for digit (ledger rows and logs print
    it): the ideal exponent of its quotient is the smallest of its terms'.
    """
    rates = tariff.rates
    ideal = rates.cost_exponent
    if len(split.creation) < len(TIERS):
        exponents = rates.term_exponents
        ideal = min(exponents["input"], exponents["read"], exponents["output"], *(exponents[t] for t in split.creation))
    return rates.decimal(rates.cost(split), ideal)


def list_cost(split: Split, tariff: Tariff) -> Decimal:
    """What the request would cost with no cache at all: (prompt·in + completion·out) / 10⁶."""
    rates = tariff.rates
    return rates.decimal(rates.list_cost(split), min(rates.term_exponents["input"], rates.term_exponents["output"]))
