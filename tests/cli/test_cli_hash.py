"""`promptcache hash` as a user runs it: the installed console script, real files, exit codes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMPTCACHE, *args], input=stdin, capture_output=True, text=True, timeout=60)


def test_hash_example_with_tokenizer_prints_blocks_and_forward_body() -> None:
    example = str(ROOT / "examples/request-openai.json")
    result = run("hash", "--api", "openai", "--tokenizer", "tiktoken:cl100k_base", example)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    roles = [b["role"] for b in out["blocks"]]
    assert roles == ["tool_definition", "system", "user", "tool_call", "tool", "user"]
    assert [b["index"] for b in out["blocks"]] == [0, 1, 2, 3, 4, 5]
    assert [b["breakpoint"] for b in out["blocks"]] == [None, "1h", None, None, None, "5m"]
    tokens = [b["tokens"] for b in out["blocks"]]
    assert all(isinstance(t, int) for t in tokens) and tokens == sorted(tokens) and tokens[0] > 0
    assert all(len(b["hash"]) == 64 for b in out["blocks"])
    assert "cache_control" not in json.dumps(out["forward"])
    assert out["forward"]["tools"][0]["function"]["name"] == "lookup_order"


def test_hash_from_stdin_without_tokenizer_has_null_tokens_and_spec_hash() -> None:
    body = {"messages": [{"role": "user", "content": "hi", "cache_control": None}]}
    result = run("hash", "--api", "anthropic", "-", stdin=json.dumps(body))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    expected = hashlib.sha256(b'user\x00{"text":"hi","type":"text"}').hexdigest()
    assert out["blocks"] == [{"index": 0, "role": "user", "hash": expected, "tokens": None, "breakpoint": None}]


def test_hash_policy_file_applies_default_ttl_and_automatic_placement(tmp_path: Path) -> None:
    body = {
        "system": [{"type": "text", "text": "x-billing-nonce: 42"}, {"type": "text", "text": "rules"}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "q", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "again"},
        ],
    }
    request = tmp_path / "body.json"
    request.write_text(json.dumps(body))
    policy = ROOT / "examples/quickstart/cachepolicy.yaml"
    result = run("hash", "--api", "anthropic", "--policy", str(policy), str(request))
    assert result.returncode == 0, result.stderr
    blocks = json.loads(result.stdout)["blocks"]
    assert [(b["index"], b["role"], b["breakpoint"]) for b in blocks] == [
        (1, "system", None), (2, "user", "5m"), (3, "assistant", None), (4, "user", "5m"),
    ]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a",
                                                      "cache_control": {"type": "persistent"}}]}]},
         "block 0 (messages[0].content[0]): type:"),
        ({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "a", "cache_control": {"type": "ephemeral", "ttl": "5m"}},
            {"type": "text", "text": "b", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]},
         "block 1 (messages[0].content[1]): ttl_order:"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a",
                                                      "cache_control": {"type": "ephemeral", "ttl": "7d"}}]}]},
         "block 0 (messages[0].content[0]): tier:"),
    ],
)
def test_hash_invalid_marker_exits_2_with_one_line(body: dict[str, object], fragment: str) -> None:
    result = run("hash", "--api", "openai", "-", stdin=json.dumps(body))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("invalid_cache_control: ")
    assert fragment in lines[0]


@pytest.mark.parametrize(
    ("args", "stdin", "fragment"),
    [
        (["--api", "openai", "-"], "{not json", "invalid_request_error: body is not valid JSON"),
        (["--api", "openai", "-"], '{"messages": "nope"}', "invalid_request_error: messages must be an array"),
        (["--api", "openai", "/nonexistent/body.json"], None, "cannot read /nonexistent/body.json"),
        (["--api", "openai", "--tokenizer", "tiktoken:nope", "-"], "{}", "tokenizer unavailable: unknown tiktoken"),
        (["--api", "openai", "--tokenizer", "sentencepiece", "-"], "{}", "tokenizer unavailable"),
    ],
)
def test_hash_bad_input_exits_2_with_clear_message(args: list[str], stdin: str | None, fragment: str) -> None:
    result = run("hash", *args, stdin=stdin)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_hash_bad_policy_file_exits_2(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("enabledTtls: ['5m']\ndefaultTtl: 1h\n")
    result = run("hash", "--api", "openai", "--policy", str(policy), "-", stdin='{"messages": []}')
    assert result.returncode == 2
    assert "defaultTtl '1h' is not one of enabledTtls" in result.stderr
    policy.write_text("enabledTtls: [5m\n")
    result = run("hash", "--api", "openai", "--policy", str(policy), "-", stdin='{"messages": []}')
    assert result.returncode == 2
    assert "invalid policy file" in result.stderr and "Traceback" not in result.stderr


def test_hash_unknown_api_is_a_usage_error() -> None:
    result = run("hash", "--api", "gemini", "-", stdin="{}")
    assert result.returncode == 2
    assert "invalid choice: 'gemini'" in result.stderr


def test_hash_into_a_pipe_closed_early_exits_quietly() -> None:
    """``promptcache hash … | head -1``: the reader goes away mid-output, which ends the output, not in a traceback."""
    body = {"messages": [{"role": "user", "content": f"message {i}"} for i in range(3000)]}
    process = subprocess.Popen([PROMPTCACHE, "hash", "--api", "anthropic", "-"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    process.stdin.write(json.dumps(body).encode())  # larger than a pipe's buffer, as is the output
    process.stdin.close()
    assert process.stdout.read(2) == b"{\n"
    process.stdout.close()
    assert (process.wait(timeout=60), process.stderr.read()) == (0, b"")


HEAVY = ("aiohttp", "asyncpg", "redis", "kopf")


def imported(stderr: str) -> set[str]:
    """The modules ``python -X importtime`` reports importing."""
    return {line.rpartition("|")[2].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_the_parser_loads_no_role() -> None:
    """Every subcommand's options are declared without importing the server, the database or kopf."""
    help_run = subprocess.run([sys.executable, "-X", "importtime", PROMPTCACHE, "hash", "--help"],
                              capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0 and help_run.stdout.startswith("usage: promptcache hash")
    assert "promptcache.operator.cli" in imported(help_run.stderr)
    assert imported(help_run.stderr).isdisjoint(HEAVY)
    script = "import sys; from promptcache.operator import cli; cli.build_parser(); print(*sorted(sys.modules))"
    built = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    loaded = set(built.stdout.split())
    assert "promptcache.operator.cli.replay" in loaded
    assert loaded.isdisjoint(HEAVY)
