"""A model's live state: its config, its loaded tokenizer (or why there is none), its tariff.

Tokenizers are loaded once per spec and kept across config reloads, so a price change does not
re-read a vocabulary.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from promptcache.proxy.config import ModelConfig, ProxyConfig
from promptcache.proxy.domain.pricing import Tariff
from promptcache.proxy.domain.tokens import BlockCounter, Tokenizer, TokenizerUnavailable, load_tokenizer

_log = logging.getLogger("promptcache.runtime")


@dataclass
class ModelRuntime:
    config: ModelConfig
    counter: BlockCounter | None
    """None: no usable tokenizer, so the model is served at list price without caching."""
    tariff: Tariff

    @property
    def tokenizer_version(self) -> str:
        return self.counter.tokenizer.version if self.counter else "none"


class Runtimes:
    def __init__(self) -> None:
        self._tokenizers: dict[str, Tokenizer | None] = {}
        self.models: dict[str, ModelRuntime] = {}

    def _tokenizer(self, spec: Mapping[str, Any] | None, alias: str) -> Tokenizer | None:
        key = json.dumps(spec, sort_keys=True, default=str)
        if key not in self._tokenizers:
            try:
                self._tokenizers[key] = load_tokenizer(spec)
            except TokenizerUnavailable as exc:
                _log.error("model %s has no usable tokenizer, caching disabled: %s", alias, exc)
                self._tokenizers[key] = None
        return self._tokenizers[key]

    def apply(self, config: ProxyConfig, tariffs: Mapping[str, Tariff]) -> None:
        models: dict[str, ModelRuntime] = {}
        for alias, model in config.models.items():
            tokenizer = self._tokenizer(model.tokenizer, alias)
            previous = self.models.get(alias)
            if previous is not None and previous.counter is not None and tokenizer is previous.counter.tokenizer \
                    and previous.config.image_tokens == model.image_tokens:
                counter: BlockCounter | None = previous.counter
            else:
                counter = BlockCounter(tokenizer, model.image_tokens) if tokenizer else None
            tariff = tariffs.get(alias) or Tariff.for_policy(
                alias, model.input_per_mtok, model.output_per_mtok, model.policy)
            models[alias] = ModelRuntime(model, counter, tariff)
        self.models = models
