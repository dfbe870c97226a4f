"""The proxies' Secrets copied into the namespaces they run in (docs/design.md#secrets-in-model-namespaces).

A pod reads Secrets of its own namespace only, and the DSN and Redis URL Secrets live in the operator's. With a
source namespace configured, each reconcile of a DeployedModel (and each replay Job's start) puts a copy of each
into the object's namespace and keeps its data equal to the source's. A Secret of that name that the operator did
not make (a person copied it, or an external-secrets controller writes it) is left alone and used as it is.
Copies are not owned by one model (several share them), so they stay when the last model goes.
"""

from __future__ import annotations

from typing import Any

from promptcache.operator.constants import COPIED_FROM_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL
from promptcache.operator.handlers.kube import Kube
from promptcache.operator.handlers.manifests import OperatorSettings
from promptcache.operator.handlers.outcome import Stalled

RETRY_SECONDS = 15.0
"""How soon a model stalled for a missing source Secret looks again."""


def names(settings: OperatorSettings) -> list[str]:
    """The Secrets the proxies read: the DSN's and, when Redis's URL is secret, its Secret (each once)."""
    found = [ref.partition("/")[0] for ref in (settings.database_secret, settings.redis_secret) if ref]
    return list(dict.fromkeys(found))


def copy_of(source: dict[str, Any], namespace: str) -> dict[str, Any]:
    meta = source["metadata"]
    return {
        "apiVersion": "v1", "kind": "Secret", "type": source.get("type", "Opaque"),
        "metadata": {"name": meta["name"], "namespace": namespace, "labels": {MANAGED_BY_LABEL: MANAGED_BY},
                     "annotations": {COPIED_FROM_ANNOTATION: f"{meta['namespace']}/{meta['name']}"}},
        "data": dict(source.get("data") or {}),
    }


def ours(secret: dict[str, Any]) -> bool:
    meta = secret.get("metadata") or {}
    return (meta.get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY and \
        COPIED_FROM_ANNOTATION in (meta.get("annotations") or {})


async def copy_into(kube: Kube, namespace: str, settings: OperatorSettings) -> list[str]:
    """Each proxy Secret present in ``namespace``: created, updated or unchanged (one entry per copy made).

    A source that does not exist, where no Secret of its name is in ``namespace`` either, stalls the object: its
    pods could not start (``SecretNotFound``, naming the Secret and where it was looked for).
    """
    source_namespace = settings.secret_source
    if source_namespace is None or namespace == source_namespace:
        return []
    changes = []
    for name in names(settings):
        live = await kube.secret(namespace, name)
        if live is not None and not ours(live):
            continue
        source = await kube.secret(source_namespace, name)
        if source is None:
            if live is not None:
                continue  # the source is gone: the last copy keeps the proxies running
            raise Stalled("SecretNotFound", f"Secret {name} is neither in {namespace} nor in {source_namespace}, "
                                            "where the operator copies it from", retry=RETRY_SECONDS)
        changes.append(await kube.converge(copy_of(source, namespace)))
    return changes
