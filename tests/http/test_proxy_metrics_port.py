"""``--metrics-port`` (issue 13 item 16): /metrics on a port of its own, so a NetworkPolicy can let scrapers reach
the metrics and not the API; the API's port then answers /metrics with its JSON 404."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from promptcache.proxy.testing.simulator import Simulator

from support.apierrors import assert_error
from support.faults import free_port
from support.proxy import model_config, new_key, running_proxy, settle, unique

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))


async def test_metrics_are_served_on_their_own_port_only(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path) -> None:
    port = free_port()
    config = {"models": [model_config("chat", simulator[0] + "/v1", "openai", word_tokenizer)]}
    async with running_proxy(config, tmp_path, pg_dsn, metrics_port=port) as proxy:
        key = await new_key(pg_dsn, unique("metrics"))
        async with aiohttp.ClientSession() as http:
            async with http.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                 json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 200
            await settle(proxy)
            async with http.get(proxy.url + "/metrics") as r:
                assert r.status == 404
                assert_error("openai", 404, await r.json())
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200
                families = {f.name: f for f in text_string_to_metric_families(await r.text())}
            assert sum(s.value for s in families["promptcache_requests"].samples
                       if s.name == "promptcache_requests_total") == 1.0
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200
            async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={}) as r:
                assert r.status in (404, 405)  # the API is not on the metrics port


@pytest.mark.parametrize("value", ["0", "65536", "8080"])
async def test_a_metrics_port_that_cannot_be_is_refused(tmp_path: Path, value: str) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text("models: []\n")
    process = await asyncio.create_subprocess_exec(PROMPTCACHE, "proxy", "--config", str(config), "--port", "8080",
                                                   "--metrics-port", value, stderr=asyncio.subprocess.PIPE)
    _, err = await process.communicate()
    assert (process.returncode, err.decode().strip().splitlines()[-1]) == \
        (2, "--metrics-port must be a port from 1 to 65535 other than --port")
