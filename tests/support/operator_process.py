"""``promptcache operator`` as a process of its own against the real API server, with the identity the chart
gives it (docs/design.md#testing).

``operator_identity`` renders ``charts/promptcache`` with helm-python-sdk and applies its ServiceAccount,
ClusterRoles and bindings (and Roles, in namespaced mode); the operator then runs on a token of that account, so
a verb missing from the chart's rules fails the test that needs it (the API server answers 403), and the audit
log shows every request it made (``audited``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import helm_python as helm
import yaml

from support.cluster import Cluster, KubeError
from support.controlplane import OPERATOR_ACCOUNT, OPERATOR_NAMESPACE, OPERATOR_USER, free_port, kubeconfig

CHART = Path(__file__).resolve().parents[2] / "charts" / "promptcache"
RELEASE = "promptcache"
IDENTITY_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
TEST_IMAGE = {"repository": "promptcache", "tag": "test"}


def render_chart(values: Mapping[str, Any], *, name: str = RELEASE,
                 namespace: str = OPERATOR_NAMESPACE) -> list[dict[str, Any]]:
    rendered = helm.Chart.load(CHART).render(dict(values), name=name, namespace=namespace, is_install=True)
    objects: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


@dataclass(frozen=True)
class Identity:
    kubeconfig: Path
    user: str


async def operator_identity(cluster: Cluster, directory: Path, *, release: str = RELEASE,
                            namespaces: Sequence[str] = (), values: Mapping[str, Any] | None = None) -> Identity:
    """The chart's ServiceAccount and RBAC of ``release`` (with ``operator.namespaces``: Roles in those namespaces,
    which must exist; ``values``: more chart values), applied; a kubeconfig with a token of that account."""
    try:
        await cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}})
    except KubeError as e:
        if e.status != 409:
            raise
    chart = {"image": TEST_IMAGE, "operator": {"namespaces": list(namespaces)}, **(values or {})}
    objects = [o for o in render_chart(chart, name=release) if o["kind"] in IDENTITY_KINDS]
    [account] = [o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"]
    assert account == OPERATOR_ACCOUNT or release != RELEASE, account
    for obj in objects:
        obj.setdefault("metadata", {})
        if obj["kind"] == "ServiceAccount":
            obj["metadata"]["namespace"] = OPERATOR_NAMESPACE
        try:
            await cluster.create(obj)
        except KubeError as e:
            if e.status != 409:
                raise
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"expirationSeconds": 86400}}
    response = await cluster.call(
        "POST", f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/serviceaccounts/{account}/token", json=request)
    path = kubeconfig(directory / f"{release}.kubeconfig", cluster.url, cluster.plane.ca, user=account,
                      token=response["status"]["token"])
    return Identity(kubeconfig=path, user=f"system:serviceaccount:{OPERATOR_NAMESPACE}:{account}")


@dataclass(frozen=True)
class OperatorEnvironment:
    """What the chart's Deployment would set: the database, Redis, the proxy image."""

    database_url: str | None
    redis_url: str | None
    redis_prefix: str
    proxy_image: str = "promptcache:test"
    database_secret: str = "pg/dsn"
    extra: Mapping[str, str] | None = None

    def variables(self) -> dict[str, str]:
        env = {"PROMPTCACHE_REDIS_PREFIX": self.redis_prefix, "PROMPTCACHE_PROXY_IMAGE": self.proxy_image,
               "PROMPTCACHE_DATABASE_SECRET": self.database_secret}
        if self.database_url:
            env["PROMPTCACHE_DATABASE_URL"] = self.database_url
        if self.redis_url:
            env["PROMPTCACHE_REDIS_URL"] = self.redis_url
        env.update(self.extra or {})
        return env


class OperatorProcess:
    """One run of ``promptcache operator``; ``start`` returns once its startup handlers are done (kopf's
    liveness endpoint answers only then)."""

    def __init__(self, identity: Identity, environment: OperatorEnvironment, namespaces: Sequence[str] | None,
                 log: Path) -> None:
        port = free_port()
        self.liveness = f"http://127.0.0.1:{port}/healthz"
        self.argv = [str(Path(sys.executable).with_name("promptcache")), "operator", "--verbose",
                     f"--liveness={self.liveness}"]
        self.argv += [f"--namespace={ns}" for ns in namespaces or ()]
        self.env = {**os.environ, **environment.variables(), "KUBECONFIG": str(identity.kubeconfig)}
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def _alive(self) -> bool:
        try:
            with urllib.request.urlopen(self.liveness, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    async def start(self, within: float = 30.0) -> None:
        self._out = self.log.open("ab")
        self.popen = await asyncio.to_thread(
            subprocess.Popen, self.argv, env=self.env, stdout=self._out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not await asyncio.to_thread(self._alive):
            if self.popen.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.popen.returncode}:\n{self.tail()}")
            if loop.time() > deadline:
                await self.kill()
                raise RuntimeError(f"the operator was not alive in {within}s:\n{self.tail()}")
            await asyncio.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    async def stop(self, within: float = 20.0) -> int | None:
        """SIGTERM, as Kubernetes stops a pod; SIGKILL if it does not exit in ``within`` seconds."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.popen.wait, within)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                await asyncio.to_thread(self.popen.wait)
        self._close()
        return self.popen.returncode

    async def kill(self) -> None:
        """SIGKILL: wherever the operator is, it stops; nothing more is patched."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            await asyncio.to_thread(self.popen.wait)
        self._close()

    def _close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


@asynccontextmanager
async def running_operator(identity: Identity, environment: OperatorEnvironment, log: Path, *,
                           namespaces: Sequence[str] | None = None) -> AsyncIterator[OperatorProcess]:
    """The operator, started and alive; stopped on exit (unless the test killed it), and a crash (a non-zero
    exit other than our SIGKILL) raised with the end of its log."""
    operator = OperatorProcess(identity, environment, namespaces, log)
    await operator.start()
    try:
        yield operator
    finally:
        crashed = operator.running is False and operator.popen is not None and operator.popen.returncode not in (
            0, -signal.SIGKILL)
        code = await operator.stop()
    if crashed or code not in (None, 0, -signal.SIGKILL, -signal.SIGTERM):
        raise RuntimeError(f"the operator exited with {code}:\n{operator.tail()}")


def audited(audit_log: Path, user: str = OPERATOR_USER, *, since: int = 0) -> list[dict[str, Any]]:
    """The audit events of ``user``'s requests, from byte offset ``since`` of the log on."""
    events = []
    with audit_log.open("rb") as f:
        f.seek(since)
        for line in f:
            event = json.loads(line)
            if event.get("user", {}).get("username") == user and event.get("stage") == "ResponseComplete":
                events.append(event)
    return events


StartOperator = Callable[..., AbstractAsyncContextManager[OperatorProcess]]
"""The ``start_operator`` fixture: ``async with start_operator(namespaces=[ns]) as op``."""
