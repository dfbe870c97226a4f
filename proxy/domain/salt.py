"""The ``cache_salt`` forwarded to engines that isolate KV reuse by it (docs/design.md#engine-cache-salt).

A keyed hash of the cache scope: the engine sees the same salt for the same principal, model and tokenizer, and so
reuses KV exactly where our billing does, but cannot learn who the principal is (no name leaves the proxy, and
without the key a salt cannot be recomputed from a guessed name).
"""

from __future__ import annotations

import hashlib
import hmac

from promptcache.proxy.domain.entries import Scope

SALT_PREFIX = "pc1-"
"""Versions the derivation: a new one changes every salt, so engines start their caches afresh."""


def cache_salt(key: bytes, scope: Scope) -> str:
    message = "\0".join((scope.principal_id, scope.virtual_model, scope.tokenizer_version)).encode()
    return SALT_PREFIX + hmac.new(key, message, hashlib.sha256).hexdigest()[:32]
