"""GGUF files that cannot give a tokenizer, for the tests of each place that must refuse them with the reason: the
tokenizer itself, the proxy's config (start and reload) and the operator (a proxy pod that rejects its config)."""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFWriter

BAD_GGUF = {
    "missing": r"no GGUF file at .*/missing\.gguf",
    "not-gguf": r".*/not-gguf\.gguf is not a readable GGUF file: .+",
    "no-tokenizer": r".*/no-tokenizer\.gguf holds no tokenizer \(tokenizer\.ggml\.model and tokenizer\.ggml\.tokens\)",
}
"""Each bad case's file name (``<case>.gguf``) and the whole reason it is refused with (a regular expression)."""


def gguf_without_tokenizer(path: Path, **fields: str) -> Path:
    """A valid GGUF (architecture and any string ``fields``) holding no ``tokenizer.ggml.*`` keys."""
    writer = GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def bad_gguf(directory: Path, case: str) -> Path:
    """``directory/<case>.gguf`` made bad as ``case`` says: absent, not GGUF at all, or GGUF without a tokenizer."""
    path = directory / f"{case}.gguf"
    if case == "not-gguf":
        path.write_bytes(b"GGUF" + b"\xff" * 64)
    elif case == "no-tokenizer":
        gguf_without_tokenizer(path, **{"general.name": "weights only"})
    elif case != "missing":
        raise ValueError(f"no bad GGUF case {case!r}; known: {sorted(BAD_GGUF)}")
    return path
