"""The one failure every index backend reports, so callers follow one rule: no index, no discount.

It lives with storage, not the domain: the pure rules never fail this way, they only see what
a caller does about it.
"""

from __future__ import annotations


class IndexUnavailable(Exception):
    """Any index failure (connection, timeout, pool exhaustion, bad state): bill list price.

    ``reason`` is a short token for metrics and for the commit queue's decisions (``refused``
    is never retried).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
