"""Shared fixtures for tests that need real backing services (docs/design.md#testing: a fresh database per session)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import anthropic
import openai
import pytest

from promptcache.proxy.domain.tokens import HuggingFaceTokenizer
from promptcache.proxy.http.server import serving
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.schema import migrate
from promptcache.proxy.testing.simulator import Simulator, SimulatorSettings

from support.cluster import Cluster, connected
from support.controlplane import ControlPlane
from support.controlplane import control_plane as start_control_plane
from support.database import scratch_database
from support.engine import Engine, llama_server
from support.faults import SDK, Clients, Relay
from support.operator_process import (
    Identity,
    OperatorEnvironment,
    OperatorProcess,
    StartOperator,
    operator_identity,
    running_operator,
)
from support.proxy import RunningProxy, redis_prefix, write_word_tokenizer


@pytest.fixture(scope="session")
async def pg_dsn() -> AsyncIterator[str]:
    """The session's migrated database."""
    async with scratch_database() as dsn:
        await migrate(dsn)
        yield dsn


@pytest.fixture
async def empty_pg_dsn() -> AsyncIterator[str]:
    """A database of the test's own, not migrated: for tests that must see every row or the bare schema."""
    async with scratch_database() as dsn:
        yield dsn


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[Database]:
    """A pool on the session's database; the storage modules (index, ledger, tariffs…) are built over it."""
    db = await Database.connect(pg_dsn)
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture(scope="session")
async def simulator(word_tokenizer: Path) -> AsyncIterator[tuple[str, Simulator]]:
    """The simulated upstream (word tokenizer, 3 tokens of template overhead per message)."""
    sim = Simulator(SimulatorSettings(HuggingFaceTokenizer(str(word_tokenizer))))
    async with serving(sim.app()) as url:
        yield url, sim


@pytest.fixture(scope="session")
def redis_url() -> str:
    return os.environ.get("PROMPTCACHE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """etcd, kube-apiserver and kube-controller-manager for the session (started on first use)."""
    with start_control_plane() as plane:
        yield plane


@pytest.fixture(scope="session")
async def kube_setup(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """The operator's identity from the chart (the control plane installed the CRDs)."""
    async with connected(control_plane) as cluster:
        return await operator_identity(cluster, tmp_path_factory.mktemp("identity"))


@pytest.fixture
async def kube(control_plane: ControlPlane, kube_setup: Identity) -> AsyncIterator[Cluster]:
    """The real API server as ``system:masters``, for one test; namespaces it makes are deleted after."""
    async with connected(control_plane) as cluster:
        yield cluster


@pytest.fixture
async def operator_env(pg_dsn: str, redis_url: str) -> AsyncIterator[OperatorEnvironment]:
    """The session's database, the shared Redis under a key prefix of the test's own (deleted after)."""
    async with redis_prefix(redis_url, "optest") as prefix:
        yield OperatorEnvironment(database_url=pg_dsn, redis_url=redis_url, redis_prefix=prefix)


@pytest.fixture
def start_operator(kube_setup: Identity, operator_env: OperatorEnvironment, tmp_path: Path) -> StartOperator:
    """``async with start_operator(namespaces=[ns]) as op``: ``promptcache operator`` with the chart's identity;
    ``environment=`` replaces the test's default one. Each start appends to the test's ``operator.log``."""

    def start(namespaces: Sequence[str] | None = None,
              environment: OperatorEnvironment | None = None) -> AbstractAsyncContextManager[OperatorProcess]:
        return running_operator(kube_setup, environment or operator_env, tmp_path / "operator.log",
                                namespaces=namespaces)

    return start


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """llama-server with SmolLM2-135M-Instruct, one per session (started on first use)."""
    with llama_server() as server:
        yield server


@pytest.fixture
async def sdk() -> AsyncIterator[SDK]:
    """``sdk(proxy, key)``: both SDKs as one principal, closed at teardown."""
    made: list[Clients] = []

    def make(proxy: RunningProxy, key: str) -> Clients:
        made.append(Clients(openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0),
                            anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0)))
        return made[-1]

    yield make
    for c in made:
        await c.oa.close()
        await c.an.close()


@pytest.fixture
async def pg_relay(pg_dsn: str) -> AsyncIterator[Relay]:
    """A relay in front of the session's Postgres, for a test that needs it slow (``delay``) or unreachable
    (``cut``) without touching the shared server."""
    relay = await Relay.to_postgres(pg_dsn)
    try:
        yield relay
    finally:
        await relay.close()
