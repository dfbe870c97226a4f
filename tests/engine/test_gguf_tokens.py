"""The GGUF tokenizer counts exactly as the engine does (docs/design.md#tokens): our count of each text equals
llama-server's own ``/tokenize`` of it, for the model the engine serves; and a file that cannot give a tokenizer is
refused with the reason."""

from __future__ import annotations

import json
import random
import urllib.request
from pathlib import Path

import pytest
from gguf import GGUFWriter

from promptcache.proxy.domain.tokens import GgufTokenizer, TokenizerUnavailable, load_tokenizer, parse_tokenizer_flag

from support.engine import Engine, model_path
from support.gguf import gguf_without_tokenizer

EDGES = [
    "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "a", "Hello world", "  leading spaces", "trailing   ",
    "don't it's we're they've I'm you'll he'd", "DON'T IT'S", "numbers 12345 and 3.14159, 1,000,000",
    "unicode ✓ 中文 日本語 한국어 émoji 🎉🎉 👩‍👩‍👧", "Ünïcödé àccents", "ﬁ ligature Ⅻ ① ²",
    "code: def f(x):\n    return x**2\n", "if (a && b) { return c->d[0]; }", "SELECT * FROM t WHERE x = 'y';",
    "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "<|im_start", "a<|im_end|>b",
    "a" * 66, "Pneumonoultramicroscopicsilicovolcanoconiosis",
    "https://example.com/path?query=1&b=2#frag", "user@example.com", "C:\\Windows\\System32", "~/.config/x.yaml",
    "    indented\n        twice\n", "mixed \r\n line endings\r\n", "zero\u200bwidth", "nbsp\u00a0here",
    "!!!???...", "\u2014\u2013-", "«quotes» „German“ “curly”", "1st 2nd 3rd 4th", "0x1F 0b1010 1e-9", "$1.50 €2 ¥3",
]
ALPHABET = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") + [" "] * 12 + ["\n", "\t", "  "]
            + list(".,;:!?'\"()[]{}<>/\\|@#$%^&*-_=+~`") + list("éüñçøßæ中文字日本語한국어")
            + ["🎉", "✓", "\u2019", "…"])
WORDS = ["the", "cache", "prefix", "token", "Kubernetes", "don't", "isn't", "42", "3.14", "naïve", "日本", "def",
         "return", "self", "x", "y", "==", "->", "<|im_end|>"]


def corpus() -> list[str]:
    rng = random.Random(20261202)
    texts = list(EDGES)
    for _ in range(120):
        texts.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 120))))
    for _ in range(80):
        sep = rng.choice([" ", "  ", "\n", " \n ", "\t", ""])
        texts.append(sep.join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))))
    return texts


def engine_count(engine: Engine, text: str) -> int:
    request = urllib.request.Request(f"{engine.url}/tokenize", data=json.dumps({"content": text}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return len(json.load(response)["tokens"])


def test_our_count_is_the_engines_for_every_text(engine: Engine) -> None:
    tokenizer = load_tokenizer(parse_tokenizer_flag(f"gguf:{model_path()}"))
    texts = corpus()
    assert len(texts) >= 200
    differ = [(t, engine_count(engine, t), tokenizer.count(t)) for t in texts]
    differ = [d for d in differ if d[1] != d[2]]
    assert differ == [], f"{len(differ)} of {len(texts)} texts counted differently (text, engine, ours): {differ[:5]}"


def test_identity_is_the_vocabulary() -> None:
    first, second = GgufTokenizer(str(model_path())), GgufTokenizer(str(model_path()))
    assert first.version == second.version == "gguf:smollm:3cede1a4c51d"


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerUnavailable, match=r"^no GGUF file at .*missing\.gguf$"):
        GgufTokenizer(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all", b"GGUF" + b"\xff" * 64, b"\x00" * 4096])
def test_a_file_that_is_not_gguf(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(TokenizerUnavailable, match=r"is not a readable GGUF file"):
        GgufTokenizer(str(path))


def test_a_gguf_without_a_tokenizer(tmp_path: Path) -> None:
    path = gguf_without_tokenizer(tmp_path / "weights-only.gguf")
    with pytest.raises(TokenizerUnavailable, match=r"holds no tokenizer"):
        GgufTokenizer(str(path))


def test_an_unsupported_tokenizer_model_is_refused_not_guessed(tmp_path: Path) -> None:
    writer = GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TokenizerUnavailable, match=r"GGUF tokenizer model 'llama' is not supported"):
        GgufTokenizer(str(tmp_path / "spm.gguf"))
