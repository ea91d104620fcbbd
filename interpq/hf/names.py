"""Does a model name resolve? Checked when a batch is submitted, in well under a second.

A name is fine when it is a built-in model (loaded without the hub), an existing local path,
an id already in the Hugging Face cache, or an id the hub knows (asked with a short timeout).
Otherwise ``UnknownModel`` says which of these failed, lists the built-in models and says
when the hub could not be reached, so that a typo is refused at submit instead of costing a
worker a long series of hub retries.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from interpq.hf.loading import _MINILM_ALIASES, MINILM_NAME, TINY_GPT2_NAME

BUILTIN_MODELS = (MINILM_NAME, TINY_GPT2_NAME)
"""Models that load without the hub (their weights ship with the package or are seeded)."""
HUB_TIMEOUT_S = 2.0
HUB_URL = "https://huggingface.co"


class UnknownModel(ValueError):
    """The model name resolves to nothing loadable; the message says why and what would."""


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith((".safetensors", ".bin"))


def _in_hf_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id, say
        return False
    return isinstance(found, str)


def _ask_hub(name: str, timeout_s: float) -> tuple[bool | None, str]:
    """(True, "") if the hub has the model, (False, why) if it says no, (None, why) if it
    could not be asked (offline, unreachable)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return None, "HF_HUB_OFFLINE=1"
    import requests

    endpoint = os.environ.get("HF_ENDPOINT", HUB_URL).rstrip("/")
    try:
        resp = requests.head(f"{endpoint}/api/models/{name}", timeout=timeout_s)
    except requests.RequestException as exc:
        return None, f"{type(exc).__name__} from {endpoint}"
    if resp.status_code == 200:
        return True, ""
    return False, f"the hub answered {resp.status_code} for it"


def check_model_name(name: str, hub_timeout_s: float = HUB_TIMEOUT_S) -> None:
    """Raise ``UnknownModel`` unless ``name`` is a built-in model, an existing path, a cached
    Hugging Face id or an id the hub has."""
    if name in _MINILM_ALIASES or name == TINY_GPT2_NAME:
        return
    builtin = ", ".join(BUILTIN_MODELS)
    close = difflib.get_close_matches(name, [*BUILTIN_MODELS, *_MINILM_ALIASES], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    path = Path(name).expanduser()
    if path.exists():
        return
    if _looks_like_path(name):
        raise UnknownModel(f"{name!r}: no such file or directory; {hint}built-in models: {builtin}")
    if _in_hf_cache(name):
        return
    known, why = _ask_hub(name, hub_timeout_s)
    if known:
        return
    where = (
        f"the Hugging Face hub cannot be reached ({why}), so it cannot be downloaded"
        if known is None
        else f"not on the Hugging Face hub ({why})"
    )
    raise UnknownModel(
        f"{name!r} is not a built-in model, a local path or a cached Hugging Face id, and "
        f"{where}; {hint}built-in models: {builtin}"
    )
