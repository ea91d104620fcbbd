"""Providers: where an OpenAI-compatible API lives, its limits, its prices, its key's *name*.

Presets ship in ``interpq/presets/providers.toml``; a user's file (``INTERPQ_PROVIDERS``) is
merged over them. Keys are read from the environment at the moment of use and never stored.
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from interpq.errors import ConfigError, MissingApiKey
from interpq.settings import Settings, env_value, get_settings

_PLACEHOLDER = re.compile(
    r"^\s*$|^your[_-].*|.*[_-]here$|^<.*>$|^changeme$|^replace[_-]?me$|^x{3,}$|^sk-x+$|^\.\.\.$|^todo$",
    re.IGNORECASE,
)


class ModelPrice(BaseModel):
    """Price of one model in USD per million tokens, and optional limits of its own."""

    input_usd_per_mtok: float = Field(ge=0)
    output_usd_per_mtok: float = Field(ge=0)
    rpm: int | None = Field(default=None, gt=0)
    """Requests per minute for this model alone (besides the provider's)."""
    tpm: int | None = Field(default=None, gt=0)
    """Tokens per minute for this model alone (besides the provider's)."""
    max_concurrency: int | None = Field(default=None, gt=0)
    """Calls of this model in flight at once, over every worker (besides the provider's)."""

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        """What a call with these token counts costs."""
        return (
            input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok
        ) / 1e6


class Provider(BaseModel):
    """One OpenAI-compatible endpoint with its limits and prices."""

    name: str
    base_url: str
    """Base URL ending in ``/v1``."""
    api_key_env: str | None = None
    """Name of the environment variable holding the key (None: no key needed)."""
    rpm: int = Field(default=60, gt=0)
    """Requests per minute the provider allows."""
    tpm: int = Field(default=100_000, gt=0)
    """Tokens per minute the provider allows."""
    max_concurrency: int = Field(default=8, gt=0)
    """Calls in flight at once, over every worker."""
    safety_margin: float | None = Field(default=None, gt=0, le=1)
    """Fraction of rpm/tpm to use (default: INTERPQ_SAFETY_MARGIN, 0.97)."""
    models: dict[str, ModelPrice] = Field(default_factory=dict)

    def api_key(self) -> str | None:
        """The key from the environment; raises ``MissingApiKey`` naming the variable."""
        if self.api_key_env is None:
            return None
        value = env_value(self.api_key_env)
        if value is None:
            raise MissingApiKey(self.name, self.api_key_env)
        if _PLACEHOLDER.match(value):
            raise MissingApiKey(self.name, self.api_key_env, placeholder=True)
        return value

    def price(self, model: str) -> ModelPrice:
        """The model's price; ``ConfigError`` when it is not listed."""
        try:
            return self.models[model]
        except KeyError:
            raise ConfigError(
                f"model {model!r} is not listed for provider {self.name!r}; "
                f"listed: {', '.join(sorted(self.models)) or 'none'} "
                "(add it with its prices to your providers file)"
            ) from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"providers file {where}: {exc}") from exc


def load_providers(settings: Settings | None = None) -> dict[str, Provider]:
    """Presets merged with the user's providers file; the local URL override applied."""
    settings = settings or get_settings()
    preset = resources.files("interpq").joinpath("presets/providers.toml").read_text()
    data = _read_toml(preset, "presets")
    if settings.providers is not None:
        path = Path(settings.providers)
        if not path.is_file():
            raise ConfigError(f"INTERPQ_PROVIDERS points to {path}, which does not exist")
        data = _merge(data, _read_toml(path.read_text(), str(path)))
    if settings.local_provider_url:
        data["providers"]["local"]["base_url"] = settings.local_provider_url
    providers: dict[str, Provider] = {}
    for name, raw in data.get("providers", {}).items():
        try:
            providers[name] = Provider(name=name, **raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"providers.{name}.{loc}: {err['msg']}") from None
    return providers


def get_provider(name: str, settings: Settings | None = None) -> Provider:
    """One provider by name; ``ConfigError`` listing the known ones otherwise."""
    providers = load_providers(settings)
    if name not in providers:
        raise ConfigError(
            f"unknown provider {name!r}; known: {', '.join(sorted(providers))} "
            "(define it in the file named by INTERPQ_PROVIDERS)"
        )
    return providers[name]
