"""The chart's Grafana dashboard and PrometheusRule (docs/design.md#dashboards-and-alerts) against a real proxy's
/metrics: every metric they use is one the proxy exposes, every query parses, and the alerts fire as documented
(promtool, from Debian's ``prometheus`` package, which .ci/setup installs)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from promptcache.proxy.testing.simulator import Simulator

from support.operator_process import TEST_IMAGE, render_chart
from support.proxy import model_config, new_key, running_proxy, settle, unique, words

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
ENABLED = {"image": TEST_IMAGE, "metrics": {"dashboard": {"enabled": True},
                                            "prometheusRule": {"enabled": True, "labels": {"release": "kps"}}}}


def exposed(text_format: str) -> set[str]:
    """Every series name the exposition has or would have once labelled (a labelled family has no samples yet)."""
    names = set()
    for family in text_string_to_metric_families(text_format):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ())}
    return names


def chart_parts() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The dashboard's ConfigMap, its dashboard, and the PrometheusRule, as the chart renders them."""
    objects = render_chart(ENABLED)
    [board] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
    [rule] = [o for o in objects if o["kind"] == "PrometheusRule"]
    return board, json.loads(board["data"]["promptcache.json"]), rule


def panel_queries(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def promtool(*args: str | Path) -> str:
    tool = shutil.which("promtool")
    assert tool is not None, "promtool is missing: .ci/setup installs Debian's prometheus package"
    done = subprocess.run([tool, *map(str, args)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_dashboard_and_rules_are_optional_and_labelled() -> None:
    kinds = [o["kind"] for o in render_chart({"image": TEST_IMAGE})]
    assert "PrometheusRule" not in kinds and "ConfigMap" not in kinds
    board, dashboard, rule = chart_parts()
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"  # the Grafana sidecar's default label
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert dashboard["uid"] == "promptcache" and {v["name"] for v in dashboard["templating"]["list"]} == {
        "datasource", "model"}
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Spend per model ($/h)", "Spend per tenant, top 10 ($/h)", "Hit rate by model",
            "Added latency (p50, p90, p99)", "Index fallbacks by reason", "Ledger queue depth",
            "Ledger rows dropped"} <= titles


async def test_every_metric_the_dashboard_and_rules_use_is_on_a_real_proxys_metrics(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path) -> None:
    config = {"models": [model_config("chat", simulator[0] + "/v1", "openai", word_tokenizer)]}
    async with running_proxy(config, tmp_path, pg_dsn) as proxy, aiohttp.ClientSession() as http:
        key = await new_key(pg_dsn, unique("dash"))
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
        await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": words("d", 12)}])
        await settle(proxy)
        async with http.get(proxy.url + "/metrics") as response:
            names = exposed(await response.text())
    _, dashboard, rule = chart_parts()
    queries = panel_queries(dashboard) + [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    used = {name for query in queries for name in re.findall(r"\bpromptcache_\w+", query)}
    assert len(used) >= 15
    assert used - names == set()


def test_every_rule_and_panel_query_parses(tmp_path: Path) -> None:
    _, dashboard, rule = chart_parts()
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rule["spec"]))
    assert "SUCCESS: 4 rules found" in promtool("check", "rules", rules)
    # The panels' queries as recording rules (Grafana's variables given values), so promtool parses them too.
    concrete = [q.replace("$__rate_interval", "5m").replace("$model", ".*") for q in panel_queries(dashboard)]
    panels = tmp_path / "panels.yaml"
    panels.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": [
        {"record": f"dashboard:panel_{i}", "expr": q} for i, q in enumerate(concrete)]}]}))
    assert f"SUCCESS: {len(concrete)} rules found" in promtool("check", "rules", panels)


def alert(name: str, at: str, fired: list[dict[str, str]], rule: dict[str, Any],
          summaries: list[str] | None = None) -> dict[str, Any]:
    [description] = [r["annotations"]["description"] for g in rule["spec"]["groups"] for r in g["rules"]
                     if r.get("alert") == name]
    return {"eval_time": at, "alertname": name, "exp_alerts": [
        {"exp_labels": labels, "exp_annotations": {"summary": summary, "description": description}}
        for labels, summary in zip(fired, summaries or [], strict=True)]}


def test_the_alerts_fire_when_they_should_and_not_before(tmp_path: Path) -> None:
    _, _, rule = chart_parts()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    at = {"namespace": "models"}
    series = [
        # pod a: 3 rows dropped at 2m; its spool grows by 20 a minute from 0; pod b stops being ready at 1m.
        ('promptcache_ledger_dropped_total{namespace="models",pod="a"}', "0 0 3 3 3 3 3 3 3 3"),
        ('promptcache_ledger_queue_depth{namespace="models",pod="a"}', "0+20x30"),
        ('promptcache_ready{namespace="models",pod="a"}', "1x30"),
        ('promptcache_ready{namespace="models",pod="b"}', "1 0x30"),
        # a tenth of the namespace's requests fall back throughout
        ('promptcache_index_fallbacks_total{namespace="models",pod="a",reason="redis_unavailable"}', "0+10x30"),
        ('promptcache_requests_total{namespace="models",pod="a",api="openai",model="chat",outcome="ok"}',
         "0+100x30"),
    ]
    a, b = {**at, "pod": "a"}, {**at, "pod": "b"}
    tests = [
        alert("PromptcacheLedgerRowsDropped", "1m", [], rule),
        alert("PromptcacheLedgerRowsDropped", "3m", [{**a, "severity": "critical"}], rule,
              ["models/a dropped 3 ledger rows in 5 minutes"]),
        alert("PromptcacheProxyNotReady", "5m", [], rule),
        alert("PromptcacheProxyNotReady", "7m", [{**b, "severity": "critical"}], rule,
              ["models/b has answered not ready for 5 minutes"]),
        alert("PromptcacheLedgerQueueGrowing", "12m", [], rule),  # over 100 from 6m, for 10m
        alert("PromptcacheLedgerQueueGrowing", "17m", [{**a, "severity": "warning"}], rule,
              ["models/a: 340 bills waiting for Postgres, and rising"]),
        alert("PromptcacheIndexFallbacks", "9m", [], rule),
        alert("PromptcacheIndexFallbacks", "12m", [{**at, "severity": "warning"}], rule,
              ["models: 10% of requests fell back (list price or a lower index tier)"]),
    ]
    suite = tmp_path / "test.yaml"
    suite.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [
        {"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series],
         "alert_rule_test": tests}]}))
    assert "SUCCESS" in promtool("test", "rules", suite)


@pytest.mark.parametrize("values, error", [
    ({"metrics": {"prometheusRule": {"fallbackRatio": 0}}}, "fallbackRatio"),
    ({"metrics": {"prometheusRule": {"queueDepth": -1}}}, "queueDepth"),
    ({"metrics": {"dashboard": {"namespace": "Not A Namespace"}}}, "namespace"),
    ({"metrics": {"dashboard": {"labels": {"grafana_dashboard": 1}}}}, "grafana_dashboard"),
])
def test_bad_dashboard_and_rule_values_are_refused_by_the_schema(values: dict[str, Any], error: str) -> None:
    with pytest.raises(Exception, match=error):
        render_chart({"image": TEST_IMAGE, **values})
