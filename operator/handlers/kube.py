"""The Kubernetes API as the operator uses it: converge an object, read and patch our resources.

It finds its cluster the way kopf does (in-cluster service account, else ``$KUBECONFIG`` /
``~/.kube/config``) and runs the synchronous ``kubernetes`` client in worker threads, so
handlers stay async without a second client library.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, cast

import kubernetes
from kubernetes.client import (
    ApiClient,
    ApiException,
    AppsV1Api,
    BatchV1Api,
    CoreV1Api,
    CustomObjectsApi,
    NetworkingV1Api,
    PolicyV1Api,
)

from promptcache.operator.constants import GROUP, VERSION

_KINDS = {"ConfigMap": ("core", "config_map"), "Service": ("core", "service"), "Deployment": ("apps", "deployment"),
          "Job": ("batch", "job"), "NetworkPolicy": ("networking", "network_policy"),
          "PodDisruptionBudget": ("policy", "pod_disruption_budget"), "Secret": ("core", "secret")}


def load_configuration() -> kubernetes.client.Configuration:
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    return configuration


def contains(live: Any, desired: Any) -> bool:
    """Whether ``live`` already says everything ``desired`` says (the server may add defaults)."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(k in live and contains(live[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(
            contains(a, b) for a, b in zip(live, desired, strict=True))
    return bool(live == desired)


CONFLICT_ATTEMPTS = 5
"""Reads and writes of one object before a conflict is the handler's error."""


class Kube:
    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.core = CoreV1Api(client)
        self.apps = AppsV1Api(client)
        self.batch = BatchV1Api(client)
        self.custom = CustomObjectsApi(client)
        self.networking = NetworkingV1Api(client)
        self.policy = PolicyV1Api(client)

    @classmethod
    def connect(cls) -> Kube:
        return cls(ApiClient(load_configuration()))

    def close(self) -> None:
        self.client.close()  # type: ignore[no-untyped-call]

    def _op(self, verb: str, kind: str) -> Callable[..., Any]:
        api, noun = _KINDS[kind]
        return cast(Callable[..., Any], getattr(getattr(self, api), f"{verb}_namespaced_{noun}"))

    @staticmethod
    async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _read(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        meta = obj["metadata"]
        read = self._op("read", obj["kind"])
        try:
            live = await self._call(read, meta["name"], meta["namespace"], _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data: dict[str, Any] = json.loads(cast(Any, live).data)
        return data

    async def converge(self, obj: dict[str, Any]) -> str:
        """Create ``obj`` or bring the live one in line with it; returns created, updated or unchanged.

        Services are merge-patched, since a replace would have to carry their immutable cluster IP; every other
        kind is replaced whole (a container or a peer removed from the spec must go). A conflict (the object
        changed between our read and write, e.g. the Deployment controller updating it, or created meanwhile)
        is read again and retried: what we want does not depend on what was there, and kopf's retry after an
        error would wait a minute.
        """
        for _ in range(CONFLICT_ATTEMPTS - 1):
            try:
                return await self._converge_once(obj)
            except ApiException as exc:
                if exc.status != 409:
                    raise
        return await self._converge_once(obj)

    async def _converge_once(self, obj: dict[str, Any]) -> str:
        live = await self._read(obj)
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        kind = obj["kind"]
        if live is None:
            await self._call(self._op("create", kind), ns, obj)
            return "created"
        wanted = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        if contains(live, wanted):
            return "unchanged"
        if kind == "Service":
            # A JSON merge patch: lists (ports) are replaced whole. A strategic merge would merge ports by
            # their number, keeping a port someone changed beside ours, which the server refuses (two "http").
            await self._call(self.core.patch_namespaced_service, name, ns, obj,
                             _content_type="application/merge-patch+json")
        else:
            body = {**obj, "metadata": {**meta, "resourceVersion": live["metadata"]["resourceVersion"]}}
            await self._call(self._op("replace", kind), name, ns, body)
        return "updated"

    async def delete_owned(self, kind: str, namespace: str, name: str, owner_uid: str) -> bool:
        """Delete the object if ``owner_uid`` owns it (an object of that name someone else made is left alone);
        whether it was deleted. The uid precondition keeps a replacement created meanwhile."""
        live = await self._read({"kind": kind, "metadata": {"namespace": namespace, "name": name}})
        owners = {ref.get("uid") for ref in ((live or {}).get("metadata") or {}).get("ownerReferences") or []}
        if live is None or owner_uid not in owners:
            return False
        try:
            await self._call(self._op("delete", kind), name, namespace,
                             body={"preconditions": {"uid": live["metadata"]["uid"]}})
        except ApiException as exc:
            if exc.status in (404, 409):  # gone already, or replaced meanwhile
                return False
            raise
        return True

    async def deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read({"kind": "Deployment", "metadata": {"namespace": namespace, "name": name}})

    async def service(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read({"kind": "Service", "metadata": {"namespace": namespace, "name": name}})

    async def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read({"kind": "Secret", "metadata": {"namespace": namespace, "name": name}})

    async def patch_secret(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        """A JSON merge patch; with ``metadata.resourceVersion`` in it, refused (409) if the Secret changed since."""
        await self._call(self.core.patch_namespaced_secret, name, namespace, dict(patch),
                         _content_type="application/merge-patch+json")

    async def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read({"kind": "Job", "metadata": {"namespace": namespace, "name": name}})

    async def pods(self, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{k}={v}" for k, v in selector.items())
        listed = await self._call(self.core.list_namespaced_pod, namespace, label_selector=label_selector,
                                  _preload_content=False)
        return list(json.loads(cast(Any, listed).data).get("items") or [])

    async def create(self, obj: dict[str, Any]) -> None:
        """Create ``obj`` as it is: for Jobs, whose pod template cannot be converged in place."""
        await self._call(self._op("create", obj["kind"]), obj["metadata"]["namespace"], obj)

    async def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and, in the background, its pods; one already gone is fine."""
        try:
            await self._call(self.batch.delete_namespaced_job, name, namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def post_event(self, obj: Mapping[str, Any], event_type: str, reason: str, message: str,
                         component: str) -> None:
        """A core/v1 Event about ``obj``, as kopf posts them, for code that runs outside kopf's loop."""
        meta = obj["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._call(self.core.create_namespaced_event, meta["namespace"], event)

    async def get_resource(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = await self._call(
                self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    async def list_resources(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        listed: dict[str, Any] = await self._call(
            self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, plural)
        return list(listed.get("items") or [])

    async def patch_resource(self, plural: str, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        await self._call(self.custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, plural, name,
                         dict(patch))

    async def patch_resource_status(self, plural: str, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        await self._call(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace, plural,
                         name, {"status": dict(status)})
