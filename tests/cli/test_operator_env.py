"""``promptcache operator``'s environment is an entry point (docs/design.md#reconciliation): a missing image or a
malformed number stops it with the variable named, exit 2, before it touches a cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from promptcache.operator.handlers.config import EnvironmentError_, OperatorConfig

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))


def run_operator(**env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTCACHE_")}
    return subprocess.run([PROMPTCACHE, "operator", "--liveness=http://127.0.0.1:1/healthz"],
                          env={**base, "KUBECONFIG": "/nonexistent", **env}, capture_output=True, text=True,
                          timeout=60, check=False)


def test_without_an_image_the_operator_refuses_to_start() -> None:
    done = run_operator()
    assert done.returncode == 2
    assert done.stderr.strip() == ("promptcache operator: PROMPTCACHE_PROXY_IMAGE is not set: the image proxy pods "
                                   "and replay Jobs run (the chart sets it from image.repository and image.tag)")


@pytest.mark.parametrize(("name", "raw"), [
    ("PROMPTCACHE_SWEEP_INTERVAL_SECONDS", "soon"),
    ("PROMPTCACHE_SWEEP_GRACE_SECONDS", "-1"),
    ("PROMPTCACHE_LOG_RETENTION_DAYS", "nan"),
    ("PROMPTCACHE_LOG_RETENTION_DAYS", "inf"),
    ("PROMPTCACHE_INLINE_REPLAY_MAX_REQUESTS", "1e3"),
    ("PROMPTCACHE_INLINE_REPLAY_MAX_REQUESTS", "9" * 5000),
])
def test_a_malformed_number_names_its_variable(name: str, raw: str) -> None:
    with pytest.raises(EnvironmentError_) as caught:
        OperatorConfig.from_env({"PROMPTCACHE_PROXY_IMAGE": "registry.example.com/promptcache:1", name: raw})
    assert str(caught.value).startswith(f"{name} must be ")
    assert len(str(caught.value)) < 200


def test_a_bad_number_stops_the_process_too() -> None:
    done = run_operator(PROMPTCACHE_PROXY_IMAGE="promptcache:test", PROMPTCACHE_SWEEP_INTERVAL_SECONDS="x")
    assert (done.returncode, done.stderr.strip()) == (
        2, "promptcache operator: PROMPTCACHE_SWEEP_INTERVAL_SECONDS must be a number from 0 to 1000000000, got 'x'")


def test_the_chart_defaults_are_read() -> None:
    config = OperatorConfig.from_env({"PROMPTCACHE_PROXY_IMAGE": " promptcache:1 ",
                                      "PROMPTCACHE_INLINE_REPLAY_MAX_REQUESTS": "50000"})
    assert config.manifests.proxy_image == "promptcache:1"
    assert config.inline_replay_max_requests == 50_000
    assert config.housekeeping.interval.total_seconds() == 300
