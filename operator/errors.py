"""The error of a spec the operator cannot use as written, shared by every parser of one.

A DeployedModel that renders no valid proxy config and a PlanReplay (or ``promptcache replay``
flags) that propose no valid replay both raise it; ``reason`` is the condition reason a handler
reports, the message what the user reads. It imports nothing, so the CLI can raise it without
loading the handlers.
"""

from __future__ import annotations


class SpecError(ValueError):
    """A spec that cannot be used until it changes; ``reason`` is the ``Stalled`` condition's reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
