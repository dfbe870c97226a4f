"""What every reconcile returns, and the one error that stops it on a bad spec.

A reconciler computes an :class:`Outcome` (the status to patch, the events a user should see) or
raises :class:`Stalled` with a reason when the spec cannot be reconciled until someone changes
it. :func:`settled` turns the latter into the standard ``Stalled`` conditions, so no handler writes
that rule itself and no bad spec crashes the operator (docs/design.md#reconciliation).
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from promptcache.operator.handlers.conditions import Condition, merge, stalled

Event = tuple[str, str, str]
"""``(type, reason, message)`` of a Kubernetes Event: ``("Warning", "InvalidSpec", "...")``."""


@dataclass
class Outcome:
    """The status to write (merged into ``.status``) and the events to post, in order."""

    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    conditions: list[Condition] = field(default_factory=list)
    retry: float | None = None
    """Seconds until kopf runs the handler again (once the status is written): a stall that can clear without a
    change to the object, such as a Secret it needs appearing."""


class Stalled(Exception):
    """The spec cannot be reconciled as it stands: Ready and Reconciling false, Stalled true, with a reason.

    With ``retry``, what is missing lies outside the object (another object may yet appear), so the reconcile is
    tried again after that many seconds; without it, only a change to the object re-runs it."""

    def __init__(self, reason: str, message: str, retry: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry = retry

    def outcome(self, current: Iterable[Mapping[str, Any]] | None, generation: int | None) -> Outcome:
        conditions = stalled(self.reason, self.message)
        return Outcome({"observedGeneration": generation, "conditions": merge(current, conditions, generation)},
                       [("Warning", self.reason, self.message)], conditions, self.retry)


async def settled(body: kopf.Body, work: Awaitable[Outcome]) -> Outcome:
    """The reconcile's outcome, or the stalled one when it raised :class:`Stalled`."""
    try:
        return await work
    except Stalled as exc:
        return exc.outcome(body.status.get("conditions"), body.metadata.get("generation"))


def post(body: kopf.Body, events: Iterable[Event]) -> None:
    for kind, reason, message in events:
        kopf.event(body, type=kind, reason=reason, message=message)


def apply(outcome: Outcome, body: kopf.Body, patch: kopf.Patch) -> None:
    """Patch the status and post the events: the last line of every reconcile handler."""
    patch.status.update(outcome.status)
    post(body, outcome.events)
    if outcome.retry is not None:  # kopf writes the patch, then runs the handler again
        raise kopf.TemporaryError(outcome.events[-1][2] if outcome.events else "retrying", delay=outcome.retry)
