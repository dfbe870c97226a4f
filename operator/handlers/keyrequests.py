"""API keys issued for Secrets that ask for one, revoked when they go (docs/design.md#api-keys-from-secrets).

A Secret labelled ``promptcache.io/api-key-request: "true"`` in a namespace the operator serves asks for a key for
the principal ``NAMESPACE/NAME``, NAME being its ``promptcache.io/principal`` annotation (default: the Secret's
name). The namespace is the tenant boundary: whoever may create Secrets in it gets keys for its principals only.
The key is written into the Secret before it is stored in Postgres (only its SHA-256 is), so an interrupted issue
is completed, never repeated: a Secret that carries a key has that key registered, idempotently, and gets no
other. The operator's own finalizer holds the Secret until its key is revoked.

Handled from watch events with our own finalizer, not kopf's change handlers: kopf would keep the object's essence
(for a Secret, its data: the key) in an annotation and diff it in its logs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from kubernetes.client.exceptions import ApiException

from promptcache.operator.constants import (
    ISSUED_TO_ANNOTATION,
    KEY_FIELD,
    KEY_FINALIZER,
    KEY_ID_ANNOTATION,
    MANAGED_BY,
    PRINCIPAL_ANNOTATION,
)
from promptcache.operator.handlers.kube import Kube
from promptcache.operator.handlers.outcome import Event
from promptcache.proxy.domain.entries import PRINCIPAL_RULE, valid_principal
from promptcache.proxy.storage.errors import IndexUnavailable
from promptcache.proxy.storage.keys import ApiKeys, key_id_of
from promptcache.proxy.storage.postgres import Database

MAX_NAME = 200
"""Characters of a requested principal name (the namespace and a slash come on top)."""
ATTEMPTS = 5
"""Tries against an unavailable Postgres, a second apart, before the request is reported failed."""


T = TypeVar("T")


class KeyRequestError(ValueError):
    """A key request that cannot be served as it stands; the message is the Warning event's."""


def principal_of(namespace: str, meta: Mapping[str, Any]) -> str:
    """``NAMESPACE/NAME`` for the Secret's request; a bad name is a :class:`KeyRequestError`."""
    name = (meta.get("annotations") or {}).get(PRINCIPAL_ANNOTATION, meta.get("name", ""))
    if not isinstance(name, str) or not valid_principal(name) or len(name) > MAX_NAME:
        shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
        raise KeyRequestError(f"annotation {PRINCIPAL_ANNOTATION} must name a principal ({PRINCIPAL_RULE}, at most "
                              f"{MAX_NAME} characters), got {shown}")
    return f"{namespace}/{name}"


def key_in(secret: Mapping[str, Any]) -> str | None:
    """The key the Secret carries, if any; one that is not a base64 UTF-8 string is a :class:`KeyRequestError`."""
    raw = (secret.get("data") or {}).get(KEY_FIELD)
    if raw is None:
        return None
    try:
        key = base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise KeyRequestError(f"data.{KEY_FIELD} is not a key (not base64 of UTF-8 text): remove it to be issued "
                              "a new one") from None
    if not key.startswith("pc-") or not key.isprintable() or len(key) > 200:
        raise KeyRequestError(f"data.{KEY_FIELD} is not a promptcache key: remove it to be issued a new one")
    return key


async def react(secret: Mapping[str, Any], kube: Kube, pg: Database | None) -> None:
    """Handle a watch event's Secret and post what happened as an Event on it."""
    event = await handle(secret, kube, pg)
    if event is not None:
        await kube.post_event(secret, *event, component=MANAGED_BY)


async def handle(secret: Mapping[str, Any], kube: Kube, pg: Database | None) -> Event | None:
    """Issue, complete or revoke, as the Secret stands; the event to post about it, if any."""
    meta = secret["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    finalizers = list(meta.get("finalizers") or [])
    try:
        if meta.get("deletionTimestamp"):
            if KEY_FINALIZER not in finalizers:
                return None
            event = await _revoke(secret, namespace, pg)
            await kube.patch_secret(namespace, name, {"metadata": {
                "finalizers": [f for f in finalizers if f != KEY_FINALIZER],
                "resourceVersion": meta["resourceVersion"]}})
            return event
        principal = principal_of(namespace, meta)
        key = key_in(secret)
        if pg is None:
            raise KeyRequestError("the operator has no database (PROMPTCACHE_DATABASE_URL), so it cannot issue keys")
        if key is None:
            key_id, key = ApiKeys.new()
            # The key goes into the Secret first, with our finalizer; a write that raced another is refused (409)
            # and the next event sees the Secret as it is now.
            await kube.patch_secret(namespace, name, {
                "data": {KEY_FIELD: base64.b64encode(key.encode()).decode()},
                "metadata": {"finalizers": [*finalizers, KEY_FINALIZER], "resourceVersion": meta["resourceVersion"],
                             "annotations": {KEY_ID_ANNOTATION: key_id, ISSUED_TO_ANNOTATION: principal}}})
            await _register(pg, key, principal)
            return ("Normal", "KeyIssued", f"API key {key_id} issued for principal {principal}, in data.{KEY_FIELD}")
        registered = await _register(pg, key, principal)
        annotations = {KEY_ID_ANNOTATION: key_id_of(key), ISSUED_TO_ANNOTATION: principal}
        if KEY_FINALIZER not in finalizers or any((meta.get("annotations") or {}).get(k) != v
                                                  for k, v in annotations.items()):
            await kube.patch_secret(namespace, name, {"metadata": {
                "finalizers": list(dict.fromkeys([*finalizers, KEY_FINALIZER])),
                "resourceVersion": meta["resourceVersion"], "annotations": annotations}})
        return registered
    except ApiException as exc:
        if exc.status in (404, 409):  # changed or gone meanwhile: the next event sees it as it is
            return None
        raise
    except KeyRequestError as exc:
        return ("Warning", "InvalidKeyRequest", str(exc))
    except IndexUnavailable as exc:
        return ("Warning", "KeyRequestFailed", f"Postgres is unavailable ({exc}); change the Secret to try again")


async def _retried(work: Callable[[], Awaitable[T]]) -> T:
    """``work`` tried up to :data:`ATTEMPTS` times while Postgres is unavailable: a watch event is not redelivered."""
    for _ in range(ATTEMPTS - 1):
        try:
            return await work()
        except IndexUnavailable:
            await asyncio.sleep(1)
    return await work()


async def _register(pg: Database, key: str, principal: str) -> Event | None:
    """Store the key (a retry stores nothing twice); a key of another principal, or revoked, is refused."""
    registered = await _retried(lambda: ApiKeys(pg).register(key, principal))
    if registered is None or registered.principal != principal:
        raise KeyRequestError(f"the key in data.{KEY_FIELD} belongs to another principal: remove it to be issued a "
                              "new one")
    if registered.revoked:
        raise KeyRequestError(f"the key in data.{KEY_FIELD} was revoked: remove it to be issued a new one")
    if registered.new:
        return ("Normal", "KeyIssued", f"API key {key_id_of(key)} registered for principal {principal}")
    return None


async def _revoke(secret: Mapping[str, Any], namespace: str, pg: Database | None) -> Event:
    """Revoke the Secret's key if it is a key of this namespace's principals; raises IndexUnavailable (the finalizer
    stays) when Postgres cannot be reached, so a deleted Secret's key never outlives it unrevoked."""
    try:
        key = key_in(secret)
    except KeyRequestError:
        key = None
    if key is None or pg is None:
        return ("Normal", "KeyRevoked", "the Secret carried no key: nothing to revoke")
    key_id, keys = key_id_of(key), ApiKeys(pg)
    owner = await _retried(lambda: keys.owner(key))
    if owner is None or not owner.startswith(f"{namespace}/"):
        return ("Normal", "KeyRevoked", f"API key {key_id} is not one of this namespace's: nothing to revoke")
    if await _retried(lambda: keys.revoke(key_id)):
        return ("Normal", "KeyRevoked", f"API key {key_id} of principal {owner} revoked")
    return ("Normal", "KeyRevoked", f"API key {key_id} of principal {owner} was not in force: nothing to revoke")
