"""The tests' own client of the real API server (plain HTTP through aiohttp, not the product's client code),
and polling until something holds (docs/design.md#testing).

Every operator test gets namespaces of its own (``Cluster.namespace``); at the end they are deleted with
whatever is left in them, our finalizers stripped first (the operator that would release them is gone).
"""

from __future__ import annotations

import asyncio
import builtins
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, overload

import aiohttp

from promptcache.operator.constants import API_VERSION, MODELS, POLICIES, REPLAYS

from support.controlplane import ControlPlane
from support.crds import load_crds

T = TypeVar("T")
Obj = dict[str, Any]
TABLE = "application/json;as=Table;g=meta.k8s.io;v=v1"
PATCH_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}


class KubeError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body
        self.message = str(message)


def object_path(group_version: str, plural: str, namespace: str | None = None, name: str | None = None,
                subresource: str | None = None) -> str:
    path = f"/apis/{group_version}" if "/" in group_version else f"/api/{group_version}"
    if namespace is not None:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name is not None:
        path += f"/{name}"
    if subresource is not None:
        path += f"/{subresource}"
    return path


@dataclass
class Cluster:
    """The session's API server as ``system:masters``; one instance per test (its own HTTP session)."""

    plane: ControlPlane
    session: aiohttp.ClientSession
    namespaces: list[str] = field(default_factory=list)
    _kinds: dict[tuple[str, str], tuple[str, bool]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.plane.url

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; a 429 (the server's "try again", e.g. while a changed CRD's storage re-initialises) is
        retried for a few seconds, as Kubernetes clients do."""
        for attempt in range(50):
            async with self.session.request(method, self.url + path, **kwargs) as response:
                text = await response.text()
                try:
                    body = json.loads(text)
                except ValueError:
                    body = text
                if response.status == 429 and attempt < 49:
                    await asyncio.sleep(0.1)
                    continue
                if response.status >= 400:
                    raise KubeError(response.status, body)
                return body
        raise AssertionError("unreachable")

    async def resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        """(plural, namespaced) of ``kind`` from the server's discovery."""
        key = (api_version, kind)
        if key not in self._kinds:
            listing = await self.call("GET", "/api/v1" if api_version == "v1" else f"/apis/{api_version}")
            for r in listing["resources"]:
                if "/" not in r["name"]:
                    self._kinds[(api_version, r["kind"])] = (r["name"], r["namespaced"])
        if key not in self._kinds:
            raise LookupError(f"the server serves no {kind} in {api_version}")
        return self._kinds[key]

    async def create(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> Obj:
        """POST ``obj`` (its apiVersion, kind and metadata.namespace say where)."""
        plural, namespaced = await self.resource(obj["apiVersion"], obj["kind"])
        namespace = obj.get("metadata", {}).get("namespace") if namespaced else None
        params = {"dryRun": "All"} if dry_run else {}
        result: Obj = await self.call("POST", object_path(obj["apiVersion"], plural, namespace),
                                      json=dict(obj), params=params)
        return result

    async def get(self, group_version: str, plural: str, namespace: str | None, name: str) -> Obj:
        result: Obj = await self.call("GET", object_path(group_version, plural, namespace, name))
        return result

    async def get_or_none(self, group_version: str, plural: str, namespace: str | None, name: str) -> Obj | None:
        try:
            return await self.get(group_version, plural, namespace, name)
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, group_version: str, plural: str, namespace: str | None = None, *,
                   label_selector: str | None = None, field_selector: str | None = None) -> builtins.list[Obj]:
        params = {k: v for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector)) if v}
        result = await self.call("GET", object_path(group_version, plural, namespace), params=params)
        items: builtins.list[Obj] = result["items"]
        return items

    async def table(self, group_version: str, plural: str, namespace: str | None = None) -> Obj:
        """The server's Table rendering (what ``kubectl get`` prints): printer columns and cells."""
        result: Obj = await self.call("GET", object_path(group_version, plural, namespace),
                                      headers={"Accept": TABLE})
        return result

    async def patch(self, group_version: str, plural: str, namespace: str | None, name: str, patch: Any, *,
                    patch_type: str = "merge", subresource: str | None = None) -> Obj:
        """PATCH the object; ``patch_type`` is "merge" (default), "json" or "strategic"."""
        path = object_path(group_version, plural, namespace, name, subresource)
        result: Obj = await self.call("PATCH", path, data=json.dumps(patch),
                                      headers={"Content-Type": PATCH_TYPES[patch_type]})
        return result

    async def patch_status(self, group_version: str, plural: str, namespace: str | None, name: str,
                           status: Mapping[str, Any]) -> Obj:
        """Merge ``status`` into the object's status through the status subresource."""
        return await self.patch(group_version, plural, namespace, name, {"status": dict(status)},
                                subresource="status")

    async def delete(self, group_version: str, plural: str, namespace: str | None, name: str) -> Obj:
        result: Obj = await self.call("DELETE", object_path(group_version, plural, namespace, name))
        return result

    async def events(self, namespace: str | None = None, *, involving: str | None = None) -> builtins.list[Obj]:
        """Kubernetes events (core/v1), those about the object named ``involving`` when given."""
        events = await self.list("v1", "events", namespace)
        return [e for e in events if involving is None or e.get("involvedObject", {}).get("name") == involving]

    async def namespace(self, prefix: str = "t") -> str:
        """A new namespace of the test's own, deleted at the end of the test."""
        name = f"{prefix}-{secrets.token_hex(3)}"
        await self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        self.namespaces.append(name)
        return name

    async def play_kubelet(self, namespace: str, label_selector: str, *, phase: str = "Running",
                           only_pending: bool = False) -> int:
        """Do what the kubelet would: mark the selected pods ``phase`` (Running and Ready, or Succeeded/Failed
        with their containers terminated), so the real controllers see them run. Returns how many."""
        pods = await self.list("v1", "pods", namespace, label_selector=label_selector)
        if only_pending:
            pods = [p for p in pods if (p.get("status") or {}).get("phase", "Pending") == "Pending"
                    and not p["metadata"].get("deletionTimestamp")]
        for pod in pods:
            status = pod_status(pod, phase)
            try:
                await self.patch("v1", "pods", namespace, pod["metadata"]["name"], {"status": status},
                                 subresource="status")
            except KubeError as e:
                if e.status != 404:  # a pod the ReplicaSet deleted meanwhile (a rollout moves on)
                    raise
        return len(pods)

    async def roll_out(self, namespace: str, name: str, *, within: float = 60.0) -> Obj:
        """Play the kubelet for a Deployment until its rollout is complete: every pod the ReplicaSets create is
        marked Running and Ready as it appears, and the real Deployment controller moves the rollout on.
        Returns the Deployment once all replicas are updated and available."""

        async def complete() -> Obj | None:
            deployment = await self.get("apps/v1", "deployments", namespace, name)
            spec, status = deployment["spec"], deployment.get("status") or {}
            selector = ",".join(f"{k}={v}" for k, v in spec["selector"]["matchLabels"].items())
            await self.play_kubelet(namespace, selector, only_pending=True)
            replicas = spec.get("replicas", 1)
            done = (status.get("observedGeneration") == deployment["metadata"]["generation"]
                    and status.get("updatedReplicas") == replicas == status.get("availableReplicas")
                    and status.get("replicas") == replicas)
            return deployment if done else None

        return await eventually(complete, within=within, interval=0.2, what=f"the rollout of {namespace}/{name}")

    async def watch(self, path: str, version: str,
                    params: Mapping[str, str] | None = None) -> AsyncIterator[tuple[str, Obj]]:
        """(type, object) of every ADDED/MODIFIED/DELETED event at ``path`` after ``version``, for as long as the
        caller iterates: a watch the server closes is resumed from the last version seen (bookmarks move it on
        too); an ERROR event (e.g. 410 Gone) is raised as a KubeError."""
        while True:
            query = {**(params or {}), "watch": "true", "resourceVersion": version, "allowWatchBookmarks": "true"}
            async with self.session.get(self.url + path, params=query,
                                        timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as response:
                if response.status >= 400:
                    raise KubeError(response.status, await response.text())
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    while b"\n" in buffer:
                        line, _, buffer = buffer.partition(b"\n")
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise KubeError(int(obj.get("code") or 500), obj)
                        version = str(obj["metadata"]["resourceVersion"])
                        if event["type"] != "BOOKMARK":
                            yield str(event["type"]), obj

    @asynccontextmanager
    async def watching(self, group_version: str, plural: str, namespace: str | None,
                       name: str) -> AsyncIterator[Recording]:
        """Record every state of the object ``name`` from now on, as a WATCH sees it: a list (field selector
        ``metadata.name``) gives the resourceVersion to watch from and the object's state if it exists, then
        ``?watch=true&resourceVersion=...`` streams each ADDED/MODIFIED/DELETED event into the recording, in the
        server's order, until the block ends. A watch the server closes is resumed from the last version seen; a
        watch that fails (e.g. 410 Gone) is raised at the end of the block."""
        path = object_path(group_version, plural, namespace)
        selector = {"fieldSelector": f"metadata.name={name}"}
        listing = await self.call("GET", path, params=selector)
        recording = Recording(self, group_version, plural, namespace, name)
        recording.events += [("ADDED", item) for item in listing["items"]]
        version = str(listing["metadata"]["resourceVersion"])

        async def stream() -> None:
            async for kind, obj in self.watch(path, version, selector):
                recording.events.append((kind, obj))

        task = asyncio.create_task(stream())
        try:
            yield recording
        finally:
            task.cancel()
            [outcome] = await asyncio.gather(task, return_exceptions=True)
        if isinstance(outcome, Exception):
            raise RuntimeError(f"the watch of {plural}/{name} failed: {outcome}") from outcome

    async def release(self, namespace: str, *, within: float = 30.0) -> None:
        """Delete what the operator watches in ``namespace`` (our three kinds and the replay Jobs) while it still
        runs, and wait until they are gone, its finalizers released. The namespace itself is deleted in the
        background after the test (``forget``); an operator a later test runs for every namespace would otherwise
        find them there and act on them, into a namespace that refuses new content."""
        kinds = [(API_VERSION, plural) for plural in (REPLAYS, POLICIES, MODELS)] + [("batch/v1", "jobs")]
        for group_version, plural in kinds:
            for obj in await self.list(group_version, plural, namespace):
                try:
                    await self.call("DELETE", object_path(group_version, plural, namespace, obj["metadata"]["name"]),
                                    params={"propagationPolicy": "Background"})
                except KubeError as e:
                    if e.status != 404:
                        raise

        async def gone() -> bool:
            for group_version, plural in kinds:
                if await self.list(group_version, plural, namespace):
                    return False
            return True

        await eventually(gone, within=within, what=f"the operator's objects in {namespace} to be deleted")

    async def forget(self, namespace: str) -> None:
        """Delete ``namespace`` without waiting, first releasing our finalizers in it."""
        for plural in (MODELS, POLICIES, REPLAYS):
            for obj in await self.list(API_VERSION, plural, namespace):
                if obj["metadata"].get("finalizers"):
                    await self.patch(API_VERSION, plural, namespace, obj["metadata"]["name"],
                                     {"metadata": {"finalizers": None}})
        try:
            await self.delete("v1", "namespaces", None, namespace)
        except KubeError as e:
            if e.status != 404:
                raise


@dataclass
class Recording:
    """What :meth:`Cluster.watching` saw of one object: ``(type, object)`` per event, in order."""

    cluster: Cluster
    group_version: str
    plural: str
    namespace: str | None
    name: str
    events: builtins.list[tuple[str, Obj]] = field(default_factory=list)

    def states(self) -> builtins.list[Obj]:
        """Each state the object was seen in (a DELETED event carries its last one)."""
        return [obj for _, obj in self.events]

    def changes(self, extract: Callable[[Obj], T]) -> builtins.list[T]:
        """``extract`` of each state, consecutive equal values once: e.g. the sequence of a status field."""
        values: builtins.list[T] = []
        for obj in self.states():
            value = extract(obj)
            if not values or values[-1] != value:
                values.append(value)
        return values

    async def caught_up(self, *, within: float = 10.0) -> None:
        """Wait until the watch has delivered the object's current state (or its deletion)."""
        live = await self.cluster.get_or_none(self.group_version, self.plural, self.namespace, self.name)

        def seen() -> bool:
            if live is None:
                return any(kind == "DELETED" for kind, _ in self.events)
            version = live["metadata"]["resourceVersion"]
            return any(obj["metadata"]["resourceVersion"] == version for _, obj in self.events)

        await eventually(seen, within=within, what=f"the watch of {self.plural}/{self.name} to catch up")


def pod_status(pod: Mapping[str, Any], phase: str, *, exit_code: int | None = None,
               at: datetime | None = None) -> Obj:
    """The status a kubelet reports for ``pod`` in ``phase``: Running and Ready, or Succeeded/Failed with its
    containers terminated (exit 0, or ``exit_code``, default 1), as of ``at`` (default now)."""
    when = (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    if phase == "Running":
        state: Obj = {"running": {"startedAt": when}}
        ready = "True"
    else:
        code = 0 if phase == "Succeeded" else (1 if exit_code is None else exit_code)
        state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                "startedAt": when, "finishedAt": when}}
        ready = "False"
    return {
        "phase": phase, "startTime": when, "hostIP": "127.0.0.1", "podIP": "10.0.0.1",
        "podIPs": [{"ip": "10.0.0.1"}], "hostIPs": [{"ip": "127.0.0.1"}],
        "conditions": [{"type": t, "status": ready if t != "PodScheduled" else "True", "lastTransitionTime": when}
                       for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
        "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": "", "ready": ready == "True",
                               "restartCount": 0, "started": phase == "Running", "state": state}
                              for c in pod["spec"]["containers"]],
    }


@asynccontextmanager
async def connected(plane: ControlPlane) -> AsyncIterator[Cluster]:
    """A client for one test; the namespaces it made are forgotten at the end."""
    connector = aiohttp.TCPConnector(ssl=plane.ssl_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        cluster = Cluster(plane=plane, session=session)
        try:
            yield cluster
        finally:
            for namespace in cluster.namespaces:
                await cluster.forget(namespace)


async def install_crds(cluster: Cluster, crds: builtins.list[Obj] | None = None) -> None:
    """Create or replace the CRDs and wait until the server serves them (Established)."""
    for crd in crds if crds is not None else load_crds():
        name = crd["metadata"]["name"]
        live = await cluster.get_or_none("apiextensions.k8s.io/v1", "customresourcedefinitions", None, name)
        if live is None:
            await cluster.create(crd)
        else:
            body = {**crd, "metadata": {**crd["metadata"], "resourceVersion": live["metadata"]["resourceVersion"]}}
            await cluster.call("PUT", object_path("apiextensions.k8s.io/v1", "customresourcedefinitions", None,
                                                  name), json=body)

        async def established(name: str = name) -> bool:
            obj = await cluster.get("apiextensions.k8s.io/v1", "customresourcedefinitions", None, name)
            return any(c["type"] == "Established" and c["status"] == "True"
                       for c in (obj.get("status") or {}).get("conditions") or [])

        await eventually(established, what=f"CRD {name} to be Established")
    cluster._kinds.clear()


@overload
async def eventually(check: Callable[[], Awaitable[T | None]], *, within: float = ..., interval: float = ...,
                     what: str = ...) -> T: ...
@overload
async def eventually(check: Callable[[], T | None], *, within: float = ..., interval: float = ...,
                     what: str = ...) -> T: ...
async def eventually(check: Callable[[], Any], *, within: float = 20.0, interval: float = 0.05,
                     what: str = "the condition") -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; return that."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)
