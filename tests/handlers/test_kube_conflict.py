"""``Kube.converge`` against a real API server when someone else writes between our read and our replace (the
Deployment controller does, all the time): the server's 409 is read again and retried, so a reconcile does not fail
and wait kopf's minute (a flake tests/handlers/test_rbac.py once hit); a conflict that never ends is still the
handler's error, after ``CONFLICT_ATTEMPTS`` tries."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import kubernetes
import pytest
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from promptcache.operator.handlers.kube import CONFLICT_ATTEMPTS, Kube

from support.cluster import Cluster


class RacedKube(Kube):
    """A Kube whose every read of the ConfigMap is followed by someone else's real write to it, ``races`` times."""

    def __init__(self, client: ApiClient, cluster: Cluster, races: int) -> None:
        super().__init__(client)
        self.cluster, self.races, self.reads = cluster, races, 0

    async def _read(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        live = await super()._read(obj)
        self.reads += 1
        if live is not None and self.reads <= self.races:
            meta = obj["metadata"]
            await self.cluster.patch("v1", "configmaps", meta["namespace"], meta["name"],
                                     {"metadata": {"annotations": {"someone-else": str(self.reads)}}})
        return live


@pytest.fixture
async def client(kube: Cluster) -> AsyncIterator[ApiClient]:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(kube.plane.admin_kubeconfig), client_configuration=configuration)
    api = ApiClient(configuration)
    yield api
    api.close()  # type: ignore[no-untyped-call]


def config_map(ns: str, value: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "proxy", "namespace": ns},
            "data": {"proxy.yaml": value}}


async def test_a_write_between_read_and_replace_is_read_again_and_retried(kube: Cluster, client: ApiClient) -> None:
    ns = await kube.namespace("conflict")
    await kube.create(config_map(ns, "old"))
    raced = RacedKube(client, kube, races=2)
    assert await raced.converge(config_map(ns, "new")) == "updated"
    assert raced.reads == 3
    live = await kube.get("v1", "configmaps", ns, "proxy")
    assert live["data"] == {"proxy.yaml": "new"}
    assert "annotations" not in live["metadata"]  # replaced whole, as every converge is, after their last write


async def test_a_conflict_that_never_ends_is_the_handlers_error(kube: Cluster, client: ApiClient) -> None:
    ns = await kube.namespace("conflict")
    await kube.create(config_map(ns, "old"))
    raced = RacedKube(client, kube, races=CONFLICT_ATTEMPTS)
    with pytest.raises(ApiException) as caught:
        await raced.converge(config_map(ns, "new"))
    assert caught.value.status == 409
    assert raced.reads == CONFLICT_ATTEMPTS
    assert (await kube.get("v1", "configmaps", ns, "proxy"))["data"] == {"proxy.yaml": "old"}
