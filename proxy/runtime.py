"""A model's live state: its config, its loaded tokenizer (none if the config names none), its tariff.

Tokenizers are loaded once per spec and kept across config reloads, so a price change does not
re-read a vocabulary. A configured tokenizer that cannot be loaded makes the whole config invalid
(docs/design.md#tokenizers-and-their-identity): the proxy refuses to start on it and a reload keeps
the last good config, so a typo in a path never silently turns caching off.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from promptcache.proxy.config import ConfigError, ModelConfig, ProxyConfig
from promptcache.proxy.domain.pricing import Tariff
from promptcache.proxy.domain.tokens import BlockCounter, Tokenizer, TokenizerUnavailable, load_tokenizer
from promptcache.proxy.routing import Router

_log = logging.getLogger("promptcache.runtime")


@dataclass
class ModelRuntime:
    config: ModelConfig
    counter: BlockCounter | None
    """None: the config names no tokenizer, so the model is served at list price without caching."""
    tariff: Tariff
    router: Router
    """Kept across reloads while the model stays, so in-flight counts carry over."""

    @property
    def tokenizer_version(self) -> str:
        return self.counter.tokenizer.version if self.counter else "none"


class Runtimes:
    def __init__(self) -> None:
        self._tokenizers: dict[str, Tokenizer] = {}
        self.models: dict[str, ModelRuntime] = {}

    def load(self, config: ProxyConfig) -> dict[str, Tokenizer | None]:
        """Every model's tokenizer, loaded (or reused); ConfigError naming the model if one cannot be.

        A failure is not remembered, so the next config or restart tries the file again."""
        loaded: dict[str, Tokenizer | None] = {}
        for alias, model in config.models.items():
            if model.tokenizer is None:
                loaded[alias] = None
                continue
            key = json.dumps(model.tokenizer, sort_keys=True, default=str)
            if key not in self._tokenizers:
                try:
                    self._tokenizers[key] = load_tokenizer(model.tokenizer)
                except TokenizerUnavailable as exc:
                    raise ConfigError(f"model {alias!r}: cannot load its tokenizer: {exc}") from None
                _log.info("tokenizer loaded", extra={"model": alias, "tokenizer": self._tokenizers[key].version})
            loaded[alias] = self._tokenizers[key]
        return loaded

    def apply(self, config: ProxyConfig, tariffs: Mapping[str, Tariff]) -> None:
        """Swap in ``config``; nothing changes if a tokenizer cannot be loaded (ConfigError)."""
        tokenizers = self.load(config)
        models: dict[str, ModelRuntime] = {}
        for alias, model in config.models.items():
            tokenizer = tokenizers[alias]
            previous = self.models.get(alias)
            if previous is not None and previous.counter is not None and tokenizer is previous.counter.tokenizer \
                    and previous.config.image_tokens == model.image_tokens:
                counter: BlockCounter | None = previous.counter
            else:
                counter = BlockCounter(tokenizer, model.image_tokens) if tokenizer else None
            tariff = tariffs.get(alias) or Tariff.for_policy(
                alias, model.input_per_mtok, model.output_per_mtok, model.policy)
            router = previous.router if previous is not None else Router(model.upstream.bases)
            router.update(model.upstream.bases)
            router.mode, router.max_imbalance = model.routing.mode, model.routing.max_imbalance
            models[alias] = ModelRuntime(model, counter, tariff, router)
        self.models = models
