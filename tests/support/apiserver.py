"""An emulated Kubernetes API on a loopback port, and the kopf operator running its real loop against it.

``emulated_cluster()`` serves kmock's ``KubernetesEmulator`` over HTTP (``kmock.Server``), with the resource kinds
of the project declared (verbs, scope, subresources: kopf only watches what discovery says it can list and watch).
kmock 0.8's emulator is an in-memory JSON store; ``ApiServer`` below adds what kopf and API clients rely on:
uid / resourceVersion / generation / creationTimestamp, ``resourceVersion``-resumed watches with bookmarks,
the status subresource, merge- and JSON-patches (a failed ``test`` is a 422, as kopf expects), PUT, generateName,
label and field selectors, and ownerReference garbage collection. What it still does not do is listed in
``ApiServer``'s docstring.

``running_operator()`` runs ``kopf.operator()`` in a thread of its own with its own event loop (see the reason there),
logged in to the emulator, and stops it with kopf's stop-flag (or kills it, for crash tests).
"""

from __future__ import annotations

import asyncio
import bisect
import builtins
import collections
import concurrent.futures
import copy
import datetime
import logging
import os
import re
import secrets
import tempfile
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

import aiohttp
import aiohttp.web
import attrs
import jsonpatch
import kmock
import kopf
import yaml
from kmock import Response  # type: ignore[attr-defined]  # exported, but missing from __all__

from promptcache.operator.constants import API_VERSION, GROUP, MODELS, POLICIES, REPLAYS, VERSION

logger = logging.getLogger(__name__)

T = TypeVar("T")
Obj = dict[str, Any]
ObjKey = tuple[kmock.resource, str | None, str]

GROUP_VERSION = API_VERSION

# Resource keys as kmock spells them: "group/version/plural", or "v1/plural" for the core group.
DEPLOYED_MODELS = f"{GROUP_VERSION}/{MODELS}"
CACHE_POLICIES = f"{GROUP_VERSION}/{POLICIES}"
PLAN_REPLAYS = f"{GROUP_VERSION}/{REPLAYS}"
CONFIGMAPS = "v1/configmaps"
SERVICES = "v1/services"
SECRETS = "v1/secrets"
EVENTS = "v1/events"
NAMESPACES = "v1/namespaces"
DEPLOYMENTS = "apps/v1/deployments"
JOBS = "batch/v1/jobs"
LEASES = "coordination.k8s.io/v1/leases"
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"

ALL_VERBS = frozenset({"create", "delete", "get", "list", "patch", "update", "watch"})
BUILTIN_GROUPS = frozenset({"", "apps", "batch", "coordination.k8s.io", "apiextensions.k8s.io", "events.k8s.io"})


CRD_DIR = Path(__file__).resolve().parents[2] / "crds"


def _info(kind: str, *, namespaced: bool = True, status: bool = True, singular: str | None = None,
          shortnames: Iterable[str] = (), categories: Iterable[str] = ()) -> kmock.ResourceInfo:
    return kmock.ResourceInfo(
        kind=kind, singular=singular or kind.lower(), namespaced=namespaced, verbs=set(ALL_VERBS),
        subresources={"status"} if status else set(), shortnames=set(shortnames), categories=set(categories),
    )


def load_crds(directory: Path = CRD_DIR) -> list[Obj]:
    """The CustomResourceDefinitions in ``directory`` (the repo's ``crds/``)."""
    docs: list[Obj] = []
    for path in sorted(directory.glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text())
                    if doc and doc.get("kind") == "CustomResourceDefinition")
    return docs


def crd_resources(crds: Iterable[Mapping[str, Any]]) -> dict[str, kmock.ResourceInfo]:
    """Discovery entries for the served versions of these CRDs: kind, scope, names, subresources, all verbs."""
    resources: dict[str, kmock.ResourceInfo] = {}
    for crd in crds:
        spec, names = crd["spec"], crd["spec"]["names"]
        for version in spec["versions"]:
            if version.get("served", True):
                resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = _info(
                    names["kind"], namespaced=spec.get("scope") == "Namespaced",
                    status="status" in (version.get("subresources") or {}), singular=names.get("singular"),
                    shortnames=names.get("shortNames", ()), categories=names.get("categories", ()))
    return resources


def default_resources(crds: Iterable[Mapping[str, Any]] = ()) -> dict[str, kmock.ResourceInfo]:
    """The kinds the operator and its tests use: the three CRDs (docs/design.md#custom-resources; from ``crds`` where
    given) and the
    builtins the operator owns, reads or posts."""
    info = _info
    return {
        DEPLOYED_MODELS: info("DeployedModel"),
        CACHE_POLICIES: info("CachePolicy"),
        PLAN_REPLAYS: info("PlanReplay"),
        CONFIGMAPS: info("ConfigMap", status=False),
        SERVICES: info("Service"),
        SECRETS: info("Secret", status=False),
        EVENTS: info("Event", status=False),
        NAMESPACES: info("Namespace", namespaced=False),
        DEPLOYMENTS: info("Deployment"),
        JOBS: info("Job"),
        LEASES: info("Lease", status=False),
        CRDS: info("CustomResourceDefinition", namespaced=False),
    } | crd_resources(crds)


# kmock 0.8 reads "/api/v1/namespaces/X" as the prefix of a namespaced URL (and fails on "/api/v1/namespaces"),
# so requests for the cluster-scoped Namespace kind are re-addressed to an alias kmock can parse, and mapped back.
_NAMESPACE_PATH = re.compile(r"/api/v1/namespaces(?P<rest>(?:/[^/]+(?:/(?:status|finalize))?)?)/?")
_ALIAS_GROUP = "namespaces.kmock.invalid"
_ALIAS_PREFIX = f"/apis/{_ALIAS_GROUP}/v1/namespaces-alias"
_NAMESPACE_RESOURCE = kmock.resource("", "v1", "namespaces")

_VERB_OF_ACTION = {
    kmock.action.LIST: "list",
    kmock.action.WATCH: "watch",
    kmock.action.FETCH: "get",
    kmock.action.CREATE: "create",
    kmock.action.UPDATE: "patch",
    kmock.action.DELETE: "delete",
}


class _Closed:
    """Put into watch queues when the server shuts down."""


_CLOSED = _Closed()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
"""The characters the API server draws generated names from (no vowels, no look-alikes)."""


def _error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details={})


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _split_selector(text: str) -> list[str]:
    """Split a selector on the commas that are not inside ``in (a,b)`` sets."""
    return [term.strip() for term in re.split(r",(?![^()]*\))", text) if term.strip()]


def _label_matches(labels: Mapping[str, str], selector: str) -> bool:
    for term in _split_selector(selector):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term):
            key, op, values = m[1], m[2], {v.strip() for v in m[3].split(",")}
            if (op == "in") != (key in labels and labels[key] in values):
                return False
        elif m := re.fullmatch(r"(\S+?)\s*!=\s*(.*)", term):
            if labels.get(m[1]) == m[2].strip():
                return False
        elif m := re.fullmatch(r"(\S+?)\s*==?\s*(.*)", term):
            if labels.get(m[1]) != m[2].strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field_matches(obj: Mapping[str, Any], selector: str) -> bool:
    for term in _split_selector(selector):
        m = re.fullmatch(r"([\w.]+)\s*(!=|==|=)\s*(.*)", term)
        if m is None:
            raise _error(400, "BadRequest", f"unsupported field selector: {term!r}")
        value: Any = obj
        for part in m[1].split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        equal = str(value if value is not None else "") == m[3].strip()
        if equal != (m[2] != "!="):
            return False
    return True


@dataclass(frozen=True)
class _Filter:
    """What a list or watch request selects: its namespace, name, labels and fields."""

    namespace: str | None
    name: str | None
    labels: str
    fields: str

    @classmethod
    def of(cls, request: kmock.Request) -> _Filter:
        return cls(request.namespace, request.name, request.params.get("labelSelector", ""),
                   request.params.get("fieldSelector", ""))

    def __call__(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        return (
            (self.namespace is None or meta.get("namespace") == self.namespace)
            and (self.name is None or meta.get("name") == self.name)
            and (not self.labels or _label_matches(meta.get("labels") or {}, self.labels))
            and (not self.fields or _field_matches(obj, self.fields))
        )


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator with the object semantics kopf and the API clients rely on.

    On top of kmock 0.8:

    - every object gets ``metadata.uid``, ``resourceVersion`` (one counter for the server), ``generation``
      (bumped when anything outside ``metadata`` and ``status`` changes), ``creationTimestamp``, ``namespace``
      from the URL, ``apiVersion``/``kind``; ``generateName`` works; a duplicate name is a 409;
    - PATCH takes ``application/merge-patch+json`` (RFC 7386), ``application/json-patch+json`` (a failing
      ``test`` op, e.g. kopf's resourceVersion guard, is a 422) and ``application/strategic-merge-patch+json``
      for builtin kinds (applied as a merge patch: lists are replaced, never merged by key; custom resources
      answer 415 as a real server does); a ``metadata.resourceVersion`` in a merge patch or PUT body is a
      precondition (409 when stale); server-side apply (``apply-patch+yaml``) is a 415;
    - the status subresource: writes to the object leave ``status`` alone, writes to ``/status`` change only
      ``status``; creating an object with a status subresource drops its ``status``;
    - DELETE of an object with finalizers sets ``deletionTimestamp``; it goes when the last finalizer does;
      then objects whose every ownerReference points to a gone uid are deleted too (cascading, at once: no
      foreground/orphan policies), and so is everything in a deleted Namespace;
    - list and watch honour ``labelSelector`` (=, ==, !=, in, notin, exists, !exists) and ``fieldSelector``
      (=, ==, != on any dotted path); lists carry the current resourceVersion; a watch from a resourceVersion
      replays the events after it, a watch without one starts with ADDED for what exists (``sendInitialEvents``
      ends with the initial-events-end bookmark); ``timeoutSeconds`` ends the stream; BOOKMARK events are sent
      every ``bookmark_interval`` seconds of silence when ``allowWatchBookmarks`` is asked for;
    - a resource must be declared (404 otherwise) and declare the verb (405 otherwise).

    Not emulated: admission (no schema/CEL validation of CRDs, no defaulting, no webhooks), server-side apply and
    managedFields, pagination (``limit``/``continue`` are ignored: everything comes in one page), deletecollection,
    namespace existence checks for namespaced objects, 410 Gone (history is kept for the server's lifetime),
    controllers (a Deployment never becomes available, a Job never runs: tests patch their status), RBAC/auth.
    """

    bookmark_interval: float = 5.0

    _rv: int = attrs.field(default=0, init=False)
    _history: dict[kmock.resource, list[tuple[int, Obj]]] = attrs.field(
        factory=lambda: collections.defaultdict(list), init=False)
    _watchers: dict[kmock.resource, set[asyncio.Queue[Obj | _Closed]]] = attrs.field(
        factory=lambda: collections.defaultdict(set), init=False)
    _watch_counts: collections.Counter[kmock.resource] = attrs.field(factory=collections.Counter, init=False)
    _outcomes: dict[int, Obj] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[kmock.method.PUT] << self._serve_replace

    # -- request routing --------------------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        match = _NAMESPACE_PATH.fullmatch(raw_request.path)
        if match is not None:
            alias = raw_request.rel_url.with_path(_ALIAS_PREFIX + match["rest"], keep_query=True)
            raw_request = raw_request.clone(rel_url=alias)
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.resource.group == _ALIAS_GROUP:
            aliased, request = request, attrs.evolve(request, resource=_NAMESPACE_RESOURCE)
            for index in range(len(self._requests) - 1, -1, -1):  # kmock's views find requests by identity
                if self._requests[index] is aliased:
                    self._requests[index] = request
                    break
        if request.resource is None or request.resource.plural is None:  # not an object URL: discovery etc.
            return await kmock.RawHandler._handle(self, request)

        self._check_allowed(request)
        if request.action in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE) or (
            request.method == kmock.method.PUT and request.name is not None
        ):
            async with self._lock:
                self._outcomes[id(request)] = await self._mutate(request)
        try:
            return await kmock.RawHandler._handle(self, request)
        finally:
            self._outcomes.pop(id(request), None)

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo:
        if resource not in self.resources:
            raise kmock.KubernetesResourceNotFoundError()
        return self.resources[resource]

    def _check_allowed(self, request: kmock.Request) -> None:
        assert request.resource is not None
        info = self._info(request.resource)
        verb = "update" if request.method == kmock.method.PUT else _VERB_OF_ACTION.get(request.action)  # type: ignore[arg-type]
        if verb is not None and verb not in info.verbs:
            raise _error(405, "MethodNotAllowed", f"{verb} is not declared for {request.resource}")
        if request.subresource is not None and request.subresource not in info.subresources:
            raise _error(404, "NotFound", f"no subresource {request.subresource!r} in {request.resource}")

    # -- state changes (under the lock) -----------------------------------------------------------------------

    def _key(self, resource: kmock.resource, namespace: str | None, name: str) -> ObjKey:
        return (resource, namespace if self._info(resource).namespaced else None, name)

    def _current(self, key: ObjKey) -> Obj | None:
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].last.raw)

    def _store(self, key: ObjKey, obj: Obj) -> None:
        if key not in self._objects:
            self._objects[key] = obj
        elif self._objects[key].deleted:
            self._objects[key].create(obj)
        else:
            self._objects[key].history.append(obj)

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _emit(self, resource: kmock.resource, kind: str, obj: Obj) -> None:
        event = {"type": kind, "object": copy.deepcopy(obj)}
        self._history[resource].append((self._rv, event))
        for queue in self._watchers[resource]:
            queue.put_nowait(event)

    async def _mutate(self, request: kmock.Request) -> Obj:
        assert request.resource is not None
        if request.action == kmock.action.CREATE:
            return self._create(request)
        assert request.name is not None
        key = self._key(request.resource, request.namespace, request.name)
        old = self._current(key)
        if old is None:
            raise _error(404, "NotFound", f"{request.resource.plural} {request.name!r} not found")
        if request.action == kmock.action.DELETE:
            return await self._delete(key)
        return await self._update(request, key, old)

    def _create(self, request: kmock.Request) -> Obj:
        assert request.resource is not None
        resource, info = request.resource, self._info(request.resource)
        if not isinstance(request.data, dict):
            raise _error(400, "BadRequest", "the body must be a JSON object")
        obj = copy.deepcopy(request.data)
        meta = obj.setdefault("metadata", {})
        if info.namespaced:
            if request.namespace and meta.get("namespace", request.namespace) != request.namespace:
                raise _error(400, "BadRequest", "the namespace of the object does not match the URL's")
            meta["namespace"] = request.namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise _error(422, "Invalid", "metadata.name or metadata.generateName is required")
            # As the API server does: five characters of its alphabet, and a new draw when the name is
            # taken (KEP-4420, on by default since 1.31), so a busy namespace sees no spurious 409.
            for _ in range(8):
                meta["name"] = meta["generateName"] + "".join(secrets.choice(_NAME_ALPHABET) for _ in range(5))
                if self._current(self._key(resource, meta.get("namespace"), meta["name"])) is None:
                    break
        key = self._key(resource, meta.get("namespace"), meta["name"])
        if self._current(key) is not None:
            raise _error(409, "AlreadyExists", f"{resource.plural} {meta['name']!r} already exists")
        obj["apiVersion"] = f"{resource.group}/{resource.version}" if resource.group else str(resource.version)
        obj["kind"] = info.kind
        if "status" in info.subresources:
            obj.pop("status", None)
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            meta.pop(field, None)
        meta.update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=_now(), resourceVersion=self._next_rv())
        self._store(key, obj)
        self._emit(resource, "ADDED", obj)
        return obj

    async def _update(self, request: kmock.Request, key: ObjKey, old: Obj) -> Obj:
        assert request.resource is not None
        info = self._info(request.resource)
        content_type = next((v for k, v in request.headers.items() if k.lower() == "content-type"), "")
        content_type = content_type.split(";")[0].strip().lower()
        body = request.data
        new: Obj
        if request.method == kmock.method.PUT:
            if not isinstance(body, dict):
                raise _error(400, "BadRequest", "the body must be a JSON object")
            self._check_precondition(old, body)
            new = copy.deepcopy(body)
        elif content_type == "application/json-patch+json":
            if not isinstance(body, list):
                raise _error(400, "BadRequest", "a JSON patch must be a list of operations")
            try:
                new = jsonpatch.apply_patch(old, body)
            except jsonpatch.JsonPatchTestFailed as e:
                raise _error(422, "Invalid", f"the JSON patch test failed: {e}") from e
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise _error(422, "Invalid", f"the JSON patch cannot be applied: {e}") from e
        elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if content_type.startswith("application/strategic") and request.resource.group not in BUILTIN_GROUPS:
                raise _error(415, "UnsupportedMediaType", "strategic merge patches are not for custom resources")
            if not isinstance(body, dict):
                raise _error(400, "BadRequest", "a merge patch must be a JSON object")
            self._check_precondition(old, body)
            new = _merge_patch(old, body)
        else:
            raise _error(415, "UnsupportedMediaType", f"the emulator does not take {content_type!r} patches")

        # What a write may change: only the status through /status, all but the status otherwise.
        if request.subresource == "status":
            status = new.get("status")
            new = copy.deepcopy(old)
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
        elif "status" in info.subresources:
            new.pop("status", None)
            if "status" in old:
                new["status"] = old["status"]
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        meta, old_meta = new.setdefault("metadata", {}), old["metadata"]
        for field in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "generation",
                      "resourceVersion"):
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        if new == old:
            return old  # a no-op write: no new version, no event (as a real API server does)

        def essence(obj: Obj) -> Obj:
            return {k: v for k, v in obj.items() if k not in ("metadata", "status")}

        if essence(new) != essence(old):
            meta["generation"] = int(old_meta.get("generation", 0)) + 1
        meta["resourceVersion"] = self._next_rv()
        self._store(key, new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            await self._remove(key)
        else:
            self._emit(key[0], "MODIFIED", new)
        return new

    @staticmethod
    def _check_precondition(old: Obj, body: Mapping[str, Any]) -> None:
        expected = (body.get("metadata") or {}).get("resourceVersion")
        if expected is not None and expected != old["metadata"]["resourceVersion"]:
            raise _error(409, "Conflict", "the object has been modified; please apply your changes to the latest "
                                          "version and try again")

    async def _delete(self, key: ObjKey) -> Obj:
        obj = self._current(key)
        assert obj is not None
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return obj
        if meta.get("finalizers"):
            meta.update(deletionTimestamp=_now(), resourceVersion=self._next_rv())
            self._store(key, obj)
            self._emit(key[0], "MODIFIED", obj)
            return obj
        meta["resourceVersion"] = self._next_rv()
        self._store(key, obj)
        await self._remove(key)
        return obj

    async def _remove(self, key: ObjKey) -> None:
        """Drop an object for good, then whatever depended on it (ownerReferences, a namespace's content)."""
        obj = self._current(key)
        assert obj is not None
        self._objects[key].delete()
        self._emit(key[0], "DELETED", obj)
        gone_uid = obj["metadata"]["uid"]
        alive: dict[str, ObjKey] = {}
        for other_key, other in list(self._objects.items()):
            if not other.deleted:
                alive[other.last.raw["metadata"]["uid"]] = other_key
        for other_key in alive.values():
            other_meta = self._objects[other_key].last.raw["metadata"]
            owners = {ref.get("uid") for ref in other_meta.get("ownerReferences") or []}
            orphaned = gone_uid in owners and not owners & alive.keys()
            in_namespace = key[0] == _NAMESPACE_RESOURCE and other_key[1] == key[2]
            if (orphaned or in_namespace) and self._current(other_key) is not None:
                logger.debug("garbage-collecting %s (owner %s is gone)", other_key, key)
                await self._delete(other_key)

    # -- responses --------------------------------------------------------------------------------------------

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        return Response(status=201, payload=self._outcomes[id(request)])

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        return self._outcomes[id(request)]

    async def _serve_replace(self, request: kmock.Request) -> kmock.Payload:
        if id(request) not in self._outcomes:
            raise _error(405, "MethodNotAllowed", "PUT needs an object URL")
        return self._outcomes[id(request)]

    async def _serve_delete(self, request: kmock.Request) -> kmock.Payload:
        return self._outcomes[id(request)]

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None and request.name is not None
        async with self._lock:
            obj = self._current(self._key(request.resource, request.namespace, request.name))
        if obj is None:
            raise _error(404, "NotFound", f"{request.resource.plural} {request.name!r} not found")
        return obj

    def _select(self, request: kmock.Request) -> list[Obj]:
        selected = _Filter.of(request)
        found = [
            copy.deepcopy(obj.last.raw)
            for (resource, _, _), obj in self._objects.items()
            if resource == request.resource and not obj.deleted and selected(obj.last.raw)
        ]
        return sorted(found, key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None
        info = self._info(request.resource)
        async with self._lock:
            items = self._select(request)
            version = str(self._rv)
        group_version = f"{request.resource.group}/{request.resource.version}".lstrip("/")
        return {"apiVersion": group_version, "kind": f"{info.kind}List", "metadata": {"resourceVersion": version},
                "items": items}

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        assert request.resource is not None
        resource, info, params = request.resource, self._info(request.resource), request.params
        selected = _Filter.of(request)
        since = params.get("resourceVersion", "")
        initial_streaming = params.get("sendInitialEvents") == "true"
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        bookmarks = params.get("allowWatchBookmarks") == "true"
        api_version = f"{resource.group}/{resource.version}".lstrip("/")

        def bookmark(**annotations: str) -> Obj:
            meta: Obj = {"resourceVersion": str(self._rv)}
            if annotations:
                meta["annotations"] = annotations
            return {"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": info.kind, "metadata": meta}}

        queue: asyncio.Queue[Obj | _Closed] = asyncio.Queue()
        async with self._lock:  # the snapshot and the subscription at one instant: nothing lost, nothing twice
            backlog: list[Obj]
            if since in ("", "0") or initial_streaming:
                backlog = [{"type": "ADDED", "object": obj} for obj in self._select(request)]
                if initial_streaming:
                    backlog.append(bookmark(**{"k8s.io/initial-events-end": "true"}))
            elif not since.isdigit():
                raise _error(400, "BadRequest", f"invalid resourceVersion {since!r}")
            else:
                history = self._history[resource]
                start = bisect.bisect_right(history, int(since), key=lambda item: item[0])
                backlog = [event for _, event in history[start:] if selected(event["object"])]
            self._watchers[resource].add(queue)
            self._watch_counts[resource] += 1
        try:
            yield b""  # send the headers now: the stream is open even if nothing happens
            for event in backlog:
                yield event
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout is not None else None
            while True:
                wait = self.bookmark_interval if deadline is None else min(self.bookmark_interval,
                                                                           deadline - loop.time())
                if wait <= 0:
                    return
                try:
                    item = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    if bookmarks:
                        yield bookmark()
                    continue
                if isinstance(item, _Closed):
                    return
                if selected(item["object"]):
                    yield item
        finally:
            self._watchers[resource].discard(queue)

    # -- for tests --------------------------------------------------------------------------------------------

    def watches_opened(self, resource: str) -> int:
        """How many watch requests for ``resource`` ("group/version/plural") have been served so far."""
        return self._watch_counts[kmock.resource(resource)]

    def close_streams(self) -> None:
        """End every open watch stream (before the server stops, so it does not wait for them)."""
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(_CLOSED)


class KubeError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


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


_PATCH_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}


@dataclass
class EmulatedCluster:
    """The running emulator, with plain-HTTP helpers for the tests (not the product's client code)."""

    url: str
    kubeconfig: Path
    emulator: ApiServer
    session: aiohttp.ClientSession

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.session.request(method, self.url + path, **kwargs) as response:
            body = await response.json(content_type=None)
            if response.status >= 400:
                raise KubeError(response.status, body)
            return body

    def _plural(self, api_version: str, kind: str) -> str:
        for resource in self.emulator.resources:
            group_version = f"{resource.group}/{resource.version}".lstrip("/")
            if group_version == api_version and self.emulator.resources[resource].kind == kind:
                return str(resource.plural)
        raise LookupError(f"{kind} of {api_version} is not declared in the emulator")

    async def create(self, obj: Mapping[str, Any]) -> Obj:
        """POST ``obj`` (its apiVersion, kind and metadata.namespace say where)."""
        plural = self._plural(obj["apiVersion"], obj["kind"])
        namespace = obj.get("metadata", {}).get("namespace")
        path = object_path(obj["apiVersion"], plural, namespace)
        result: Obj = await self._call("POST", path, json=dict(obj))
        return result

    async def get(self, group_version: str, plural: str, namespace: str | None, name: str) -> Obj:
        result: Obj = await self._call("GET", object_path(group_version, plural, namespace, name))
        return result

    async def get_or_none(self, group_version: str, plural: str, namespace: str | None, name: str) -> Obj | None:
        try:
            return await self.get(group_version, plural, namespace, name)
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, group_version: str, plural: str, namespace: str | None = None, *,
                   label_selector: str | None = None, field_selector: str | None = None) -> list[Obj]:
        params = {k: v for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector)) if v}
        result = await self._call("GET", object_path(group_version, plural, namespace), params=params)
        items: list[Obj] = result["items"]
        return items

    async def patch(self, group_version: str, plural: str, namespace: str | None, name: str, patch: Any, *,
                    patch_type: str = "merge", subresource: str | None = None) -> Obj:
        """PATCH the object; ``patch_type`` is "merge" (default), "json" or "strategic"."""
        path = object_path(group_version, plural, namespace, name, subresource)
        result: Obj = await self._call("PATCH", path, json=patch, headers={"Content-Type": _PATCH_TYPES[patch_type]})
        return result

    async def patch_status(self, group_version: str, plural: str, namespace: str | None, name: str,
                           status: Mapping[str, Any]) -> Obj:
        """Merge ``status`` into the object's status through the status subresource."""
        return await self.patch(group_version, plural, namespace, name, {"status": dict(status)},
                                subresource="status")

    async def delete(self, group_version: str, plural: str, namespace: str | None, name: str) -> Obj:
        result: Obj = await self._call("DELETE", object_path(group_version, plural, namespace, name))
        return result

    async def events(self, namespace: str | None = None, *, involving: str | None = None) -> builtins.list[Obj]:
        """Kubernetes events (core/v1), those about the object named ``involving`` when given."""
        events = await self.list("v1", "events", namespace)
        return [e for e in events if involving is None or e.get("involvedObject", {}).get("name") == involving]

    async def wait_for_watch(self, resource: str, *, after: int = 0, within: float = 10.0) -> None:
        """Wait until more than ``after`` watch requests for ``resource`` ("group/version/plural") came in."""
        await eventually(lambda: self.emulator.watches_opened(resource) > after, within=within,
                         what=f"a watch on {resource}")


@overload
async def eventually(check: Callable[[], Awaitable[T | None]], *, within: float = ..., interval: float = ...,
                     what: str = ...) -> T: ...
@overload
async def eventually(check: Callable[[], T | None], *, within: float = ..., interval: float = ...,
                     what: str = ...) -> T: ...
async def eventually(check: Callable[[], Any], *, within: float = 10.0, interval: float = 0.02,
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


def write_kubeconfig(path: Path, url: str, namespace: str = "default") -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "kmock", "user": {"token": "kmock"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": namespace}}],
        "current-context": "kmock",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@asynccontextmanager
async def emulated_cluster(
    *,
    resources: Mapping[str, kmock.ResourceInfo] | None = None,
    crds: Iterable[Mapping[str, Any]] | None = None,
    namespaces: Iterable[str] = ("default",),
    bookmark_interval: float = 5.0,
    export_kubeconfig: bool = True,
) -> AsyncIterator[EmulatedCluster]:
    """The emulator on a loopback port, with ``namespaces`` and the ``crds`` (default: the repo's ``crds/``)
    created and served (or just the ``resources`` given), and a kubeconfig written for it.

    With ``export_kubeconfig``, ``KUBECONFIG`` points at that file until exit, so code that finds its cluster
    the default way (in-cluster, else ``$KUBECONFIG``) finds the emulator — as long as it reads the variable at
    call time (``kubernetes.config.load_kube_config()`` without ``config_file`` uses the value the variable had
    when ``kubernetes`` was first imported).
    """
    crds = list(crds) if crds is not None else load_crds()
    emulator = ApiServer(bookmark_interval=bookmark_interval)
    for key, info in (resources if resources is not None else default_resources(crds)).items():
        emulator.resources[key] = info
    with tempfile.TemporaryDirectory(prefix="kmock-") as tmp:
        async with emulator, kmock.Server(emulator) as server:
            url = str(server.url).rstrip("/")
            kubeconfig = write_kubeconfig(Path(tmp) / "kubeconfig", url)
            previous = os.environ.get("KUBECONFIG")
            if export_kubeconfig:
                os.environ["KUBECONFIG"] = str(kubeconfig)
            try:
                async with aiohttp.ClientSession() as session:
                    cluster = EmulatedCluster(url=url, kubeconfig=kubeconfig, emulator=emulator, session=session)
                    for namespace in namespaces:
                        await cluster.create({"apiVersion": "v1", "kind": "Namespace",
                                              "metadata": {"name": namespace}})
                    if kmock.resource(CRDS) in emulator.resources:
                        for crd in crds:
                            await cluster.create(crd)
                    try:
                        yield cluster
                    finally:
                        emulator.close_streams()
            finally:
                if export_kubeconfig:
                    if previous is None:
                        os.environ.pop("KUBECONFIG", None)
                    else:
                        os.environ["KUBECONFIG"] = previous


# -- the operator ---------------------------------------------------------------------------------------------

def fast_settings(settings: kopf.OperatorSettings | None = None) -> kopf.OperatorSettings:
    """kopf's settings with the waits cut for tests; nothing about persistence (that is the operator's own)."""
    settings = settings if settings is not None else kopf.OperatorSettings()
    settings.process.ultimate_exiting_timeout = None  # never SIGKILL the test process from kopf's loop
    settings.peering.standalone = True  # no KopfPeering objects in the emulator
    settings.scanning.disabled = True  # the namespaces given are taken as they are; no CRD watching
    settings.watching.connect_timeout = 5
    settings.watching.inactivity_timeout = 30  # the emulator sends a bookmark every few seconds anyway
    settings.watching.reconnect_backoff = 0.05
    settings.queueing.idle_timeout = 0.5
    settings.queueing.exit_timeout = 0.5
    settings.queueing.error_delays = [0.1, 0.2, 0.5, 1.0]
    settings.networking.error_backoffs = [0.1, 0.2, 0.5]
    settings.networking.request_timeout = 10
    settings.networking.connect_timeout = 5
    settings.persistence.consistency_timeout = 1.0
    settings.execution.default_backoff = 0.5  # retry delay of a failed handler without its own delay
    settings.posting.idle_timeout = 0.5
    settings.posting.default_backoffs = [0.1, 0.2, 0.5]
    settings.background.cancellation_polling = 0.5
    return settings


_login_urls: weakref.WeakKeyDictionary[kopf.OperatorRegistry, str] = weakref.WeakKeyDictionary()


def _ensure_login(registry: kopf.OperatorRegistry, url: str) -> None:
    """Make the registry's operator log in to ``url``.

    A login handler of its own replaces kopf's fallback logins (the ``kubernetes`` client's, kubeconfig,
    service account) for this registry; it is registered once and reads the URL of the current emulator.
    """
    first = registry not in _login_urls
    _login_urls[registry] = url
    if first:
        @kopf.on.login(registry=registry, id="kmock-emulator")
        def login_to_emulator(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=_login_urls[registry], insecure=True, default_namespace="default",
                                       priority=1000)


class RunningOperator:
    """kopf's real operator loop (``kopf.operator()``) in a thread of its own; one run per instance.

    Why a thread: when ``kopf.operator()`` stops, it cancels every task of its event loop that it did not see at
    start-up (``run_tasks`` "hung tasks") — in the test's loop that would be the emulator's and the proxy's
    connection handlers, and the stop would wait 5 s for them. In its own loop it cancels only its own. Its
    handlers therefore run in that other loop: share plain data or thread-safe objects with them, not asyncio
    objects of the test's loop.
    """

    def __init__(self, cluster: EmulatedCluster, registry: kopf.OperatorRegistry,
                 namespaces: Collection[str] | None, configure: Callable[[kopf.OperatorSettings], None] | None,
                 memo: object | None) -> None:
        self.cluster = cluster
        self.registry = registry
        self.namespaces = namespaces
        self.memo = memo
        self.settings = fast_settings()
        if configure is not None:
            configure(self.settings)
        self.settings.process.ultimate_exiting_timeout = None
        self._thread: threading.Thread | None = None
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop_flag: asyncio.Event | None = None
        self._killed = False

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._done.done()

    async def start(self, within: float = 10.0) -> None:
        if self._thread is not None or self._done.done():
            raise RuntimeError("an operator runs once; start a new one to restart")
        _ensure_login(self.registry, self.cluster.url)
        self._thread = threading.Thread(target=self._main, name="kopf-operator", daemon=True)
        self._thread.start()
        try:
            await eventually(lambda: self._ready.done() or self._done.done(), within=within,
                             what="the operator to be ready")
        except TimeoutError:
            await self.kill()
            raise
        if self._done.done():
            await self._join()
            self._done.result()  # raise the operator's error, if any
            raise RuntimeError("the operator exited before it was ready")

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:
            self._done.set_exception(e)
        else:
            self._done.set_result(None)

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_flag = asyncio.Event()
        self._task = asyncio.create_task(kopf.operator(
            registry=self.registry,
            settings=self.settings,
            clusterwide=self.namespaces is None,
            namespaces=list(self.namespaces or ()),
            standalone=True,
            ready_flag=self._ready,
            stop_flag=self._stop_flag,
            memo=self.memo,
        ))
        self._started.set()
        try:
            await self._task
        except asyncio.CancelledError:
            if not self._killed:
                raise

    async def stop(self, within: float = 10.0) -> None:
        """Stop as on SIGTERM: kopf's stop-flag; handlers get ``settings.queueing.exit_timeout`` to finish."""
        if not self.running:
            return await self._join()
        await asyncio.to_thread(self._started.wait)
        assert self._loop is not None and self._stop_flag is not None
        self._loop.call_soon_threadsafe(self._stop_flag.set)
        try:
            await eventually(self._done.done, within=within, what="the operator to stop")
        except TimeoutError:
            logger.warning("the operator did not stop in %ss; killing it", within)
            await self.kill()
        await self._join()

    async def kill(self) -> None:
        """Stop abruptly, as on SIGKILL as far as the cluster sees it: the operator's task is cancelled wherever
        it is (a handler in the middle of its work included), no cleanup handlers, nothing more is patched.
        Sync handlers already running in kopf's thread pool finish their call, though (threads can't be killed).
        """
        if self.running:
            await asyncio.to_thread(self._started.wait)
            assert self._loop is not None and self._task is not None
            self._killed = True
            self._loop.call_soon_threadsafe(self._task.cancel)
            await eventually(self._done.done, within=30, what="the killed operator to exit")
        await self._join()

    async def _join(self) -> None:
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            await asyncio.to_thread(self.settings.execution.executor.shutdown, wait=True, cancel_futures=True)

    def error(self) -> BaseException | None:
        """The operator's own failure (not a stop or a kill), once it has exited."""
        if not self._done.done():
            return None
        return self._done.exception()


@asynccontextmanager
async def running_operator(
    cluster: EmulatedCluster,
    *,
    registry: kopf.OperatorRegistry | None = None,
    namespaces: Collection[str] | None = None,
    configure: Callable[[kopf.OperatorSettings], None] | None = None,
    memo: object | None = None,
    watching: Iterable[str] = (),
    startup_timeout: float = 10.0,
) -> AsyncIterator[RunningOperator]:
    """kopf's operator loop for ``registry`` (default: kopf's default registry) against ``cluster``.

    ``namespaces=None`` is cluster-wide. ``configure`` adjusts the (already test-fast, see ``fast_settings``)
    settings before the start; the registry's startup handlers then do theirs. Scanning is off there, so namespace
    names are taken literally; for glob patterns (or to see CRDs and namespaces come and go) turn it back on with
    ``configure=lambda s: setattr(s.scanning, "disabled", False)``: the emulator serves namespaces and CRDs.

    Entered, the operator is ready (startup handlers done) and, for each resource key in ``watching`` (e.g.
    ``kube.DEPLOYED_MODELS``), has opened a new watch. On exit it is stopped (unless the test killed it) and an
    error of its own is raised. Enter again to restart it: its state is in the cluster, as in production.
    """
    registry = registry if registry is not None else kopf.get_default_registry()
    watching = list(watching)
    before = {resource: cluster.emulator.watches_opened(resource) for resource in watching}
    operator = RunningOperator(cluster, registry, namespaces, configure, memo)
    await operator.start(within=startup_timeout)
    try:
        for resource in watching:
            await cluster.wait_for_watch(resource, after=before[resource], within=startup_timeout)
        yield operator
    finally:
        await operator.stop()
    error = operator.error()
    if error is not None and not isinstance(error, asyncio.CancelledError):
        raise error


__all__ = [
    "CACHE_POLICIES",
    "CONFIGMAPS",
    "CRDS",
    "CRD_DIR",
    "DEPLOYED_MODELS",
    "DEPLOYMENTS",
    "EVENTS",
    "GROUP",
    "GROUP_VERSION",
    "JOBS",
    "LEASES",
    "NAMESPACES",
    "PLAN_REPLAYS",
    "SECRETS",
    "SERVICES",
    "VERSION",
    "ApiServer",
    "EmulatedCluster",
    "KubeError",
    "RunningOperator",
    "crd_resources",
    "default_resources",
    "emulated_cluster",
    "eventually",
    "fast_settings",
    "load_crds",
    "object_path",
    "running_operator",
    "write_kubeconfig",
]
