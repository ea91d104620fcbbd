"""Feature records, collected in one streaming pass: per SAE feature, its firing count, its
top-activating contexts, a uniform sample of its activating contexts (labelled by activation
quantile) and a uniform sample of contexts where it is silent.

A *context* is a window of ``context_left + 1 + context_right`` tokens of one text around a
centre token, with the feature's activation on every token of the window (the centre's is the
example's activation). Rows must arrive grouped by text and ordered by position within a text
(as an unshuffled activation dataset streams them); ``whole_texts`` regroups batches so that no
text is split across two chunks, and the windows are cut inside a chunk.

Per chunk ``[rows, d_sae]`` of latents, three groups of candidates are chosen with ``topk``
over rows and merged with what was kept so far (``Group.merged``):

- ``top``: the ``n_top`` largest activations;
- ``sample``: the ``n_sample`` activating rows with the smallest random keys: a uniform sample
  without replacement (bottom-k of iid keys), so partial results of disjoint parts merge into a
  uniform sample of the whole;
- ``negative``: the same for rows where the feature is exactly zero.

Memory is O(d_sae · (n_top + n_sample + n_negative) · window) whatever the dataset size. Parts
over disjoint text ranges merge exactly (``Partial.merged``). This module knows nothing about
files, tokenizers or jobs: rows arrive as tensors, token strings through a callable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

GROUPS = ("top", "sample", "negative")
EMPTY = -1
"""``text_id``/``position`` of an empty slot and ``tokens`` of a window position outside its
text."""


@dataclass(frozen=True)
class RecordSettings:
    """What to keep per feature."""

    n_top: int = 20
    """Top-activating contexts (the explainer reads these)."""
    n_sample: int = 40
    """Activating contexts sampled uniformly, labelled by activation quantile (the scorers'
    held-out examples)."""
    n_quantiles: int = 5
    """Activation quantiles the samples are labelled with (equal counts, ``0`` = weakest)."""
    n_negative: int = 20
    """Contexts where the feature is zero, sampled uniformly."""
    context_left: int = 15
    """Tokens before the centre token in a context."""
    context_right: int = 4
    """Tokens after it."""
    seed: int = 0
    """Seed of the random keys behind both samples."""

    def __post_init__(self) -> None:
        for f in ("n_top", "n_sample", "n_quantiles", "n_negative"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}: must be at least 1, got {getattr(self, f)}")
        for f in ("context_left", "context_right"):
            if not 0 <= getattr(self, f) <= 256:
                raise ValueError(f"{f}: must be between 0 and 256, got {getattr(self, f)}")

    @property
    def window(self) -> int:
        return self.context_left + 1 + self.context_right

    def sizes(self) -> dict[str, int]:
        return {"top": self.n_top, "sample": self.n_sample, "negative": self.n_negative}


@dataclass
class Group:
    """Kept contexts of every feature; ``n`` slots per feature, empty ones at score -inf."""

    score: Tensor  # [d_sae, n] what the group keeps the largest of
    value: Tensor  # [d_sae, n] the feature's activation on the centre token
    text_id: Tensor  # [d_sae, n] int64 (EMPTY: an empty slot)
    position: Tensor  # [d_sae, n] int64, the centre token's position in its text
    tokens: Tensor  # [d_sae, n, window] int64 token ids (EMPTY: outside the text)
    acts: Tensor  # [d_sae, n, window] float32 activations of the feature

    @staticmethod
    def empty(d_sae: int, n: int, window: int, device: Any = "cpu") -> Group:
        return Group(
            score=torch.full((d_sae, n), -torch.inf, device=device),
            value=torch.zeros(d_sae, n, device=device),
            text_id=torch.full((d_sae, n), EMPTY, dtype=torch.int64, device=device),
            position=torch.full((d_sae, n), EMPTY, dtype=torch.int64, device=device),
            tokens=torch.full((d_sae, n, window), EMPTY, dtype=torch.int64, device=device),
            acts=torch.zeros(d_sae, n, window, device=device),
        )

    def merged(self, other: Group, n: int) -> Group:
        """The ``n`` highest-scoring slots of both, per feature (ties: ``self`` first)."""
        score = torch.cat([self.score, other.score], dim=1)
        best = score.topk(min(n, score.shape[1]), dim=1, sorted=True).indices  # [d_sae, n]
        out = {}
        for f in fields(self):
            both = torch.cat([getattr(self, f.name), getattr(other, f.name)], dim=1)
            idx = best if both.dim() == 2 else best[..., None].expand(-1, -1, both.shape[2])
            out[f.name] = both.gather(1, idx)
        return Group(**out)

    def to(self, device: Any) -> Group:
        return Group(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass
class Partial:
    """What a pass (or a part of one) has kept so far; parts over disjoint texts merge."""

    n_tokens: int
    fire_count: Tensor  # [d_sae] int64: rows where the feature is > 0
    act_sum: Tensor  # [d_sae] float64: sum of its activations
    top: Group
    sample: Group
    negative: Group

    @staticmethod
    def empty(d_sae: int, settings: RecordSettings, device: Any = "cpu") -> Partial:
        w = settings.window
        groups = {g: Group.empty(d_sae, n, w, device) for g, n in settings.sizes().items()}
        return Partial(
            0,
            torch.zeros(d_sae, dtype=torch.int64, device=device),
            torch.zeros(d_sae, dtype=torch.float64, device=device),
            **groups,
        )

    def merged(self, other: Partial, settings: RecordSettings) -> Partial:
        sizes = settings.sizes()
        return Partial(
            self.n_tokens + other.n_tokens,
            self.fire_count + other.fire_count.to(self.fire_count.device),
            self.act_sum + other.act_sum.to(self.act_sum.device),
            **{
                g: getattr(self, g).merged(getattr(other, g).to(self.act_sum.device), sizes[g])
                for g in GROUPS
            },
        )

    def to(self, device: Any) -> Partial:
        groups = {g: getattr(self, g).to(device) for g in GROUPS}
        return replace(
            self, fire_count=self.fire_count.to(device), act_sum=self.act_sum.to(device), **groups
        )

    def tensors(self) -> dict[str, Tensor]:
        """Flat ``{"top.value": ..., "fire_count": ...}`` (for saving a part's result)."""
        out = {"fire_count": self.fire_count, "act_sum": self.act_sum,
               "n_tokens": torch.tensor([self.n_tokens], dtype=torch.int64)}  # fmt: skip
        for g in GROUPS:
            for f in fields(Group):
                out[f"{g}.{f.name}"] = getattr(getattr(self, g), f.name)
        return out

    @staticmethod
    def from_tensors(t: Mapping[str, Tensor]) -> Partial:
        groups = {
            g: Group(**{f.name: torch.as_tensor(t[f"{g}.{f.name}"]) for f in fields(Group)})
            for g in GROUPS
        }
        return Partial(
            int(t["n_tokens"][0]),
            torch.as_tensor(t["fire_count"]),
            torch.as_tensor(t["act_sum"]),
            **groups,
        )


def window_index(text_id: Tensor, position: Tensor, left: int, right: int) -> Tensor:
    """[rows, left + 1 + right]: the row holding each window position (EMPTY if the text has
    no row there). Rows must be sorted by (text, position)."""
    span = int(position.max()) + left + right + 2 if position.numel() else 1
    key = text_id * span + position  # strictly increasing
    offsets = torch.arange(-left, right + 1, device=key.device)
    target = key[:, None] + offsets[None, :]  # [rows, window]
    idx = torch.searchsorted(key, target).clamp(max=max(key.numel() - 1, 0))
    found = key[idx] == target
    return torch.where(found, idx, torch.full_like(idx, EMPTY))


def _choose(
    score: Tensor, n: int, latents: Tensor, win: Tensor, meta: Mapping[str, Tensor]
) -> Group:
    """The ``n`` best rows per feature by ``score`` [rows, d_sae] (-inf: not eligible), with
    their windows."""
    take = min(n, score.shape[0])
    top_score, rows = score.topk(take, dim=0)  # [take, d_sae]
    top_score, rows = top_score.T.contiguous(), rows.T.contiguous()  # [d_sae, take]
    ok = torch.isfinite(top_score)
    d_sae = score.shape[1]
    feat = torch.arange(d_sae, device=score.device)
    value = torch.where(ok, latents[rows, feat[:, None]], 0.0)
    w = win[rows]  # [d_sae, take, window]
    inside = (w >= 0) & ok[..., None]
    wc = w.clamp(min=0)
    acts = torch.where(inside, latents[wc, feat[:, None, None]], 0.0)
    tokens = torch.where(inside, meta["token_id"][wc], EMPTY)
    return Group(
        score=torch.where(ok, top_score, -torch.inf),
        value=value,
        text_id=torch.where(ok, meta["text_id"][rows], EMPTY),
        position=torch.where(ok, meta["position"][rows], EMPTY),
        tokens=tokens,
        acts=acts,
    )


def update(
    kept: Partial,
    latents: Tensor,
    meta: Mapping[str, Tensor],
    settings: RecordSettings,
    generator: torch.Generator,
) -> Partial:
    """Merge one chunk of whole texts: ``latents`` [rows, d_sae] ≥ 0 and ``meta`` columns
    ``text_id``, ``position``, ``token_id`` [rows], sorted by (text, position)."""
    latents = latents.float()
    meta = {k: torch.as_tensor(v, device=latents.device).long() for k, v in meta.items()}
    win = window_index(meta["text_id"], meta["position"], settings.context_left,
                       settings.context_right)  # fmt: skip
    active = latents > 0
    key = torch.rand(latents.shape, generator=generator, device=latents.device)
    chunk = Partial(
        n_tokens=latents.shape[0],
        fire_count=active.sum(0),
        act_sum=latents.sum(0, dtype=torch.float64),
        top=_choose(torch.where(active, latents, -torch.inf), settings.n_top, latents, win, meta),
        sample=_choose(
            torch.where(active, 1 - key, -torch.inf), settings.n_sample, latents, win, meta
        ),  # fmt: skip
        negative=_choose(
            torch.where(active, -torch.inf, 1 - key), settings.n_negative, latents, win, meta
        ),  # fmt: skip
    )
    return kept.merged(chunk, settings)


Batch = tuple[Tensor, Mapping[str, Tensor]]


def whole_texts(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Regroup ``(x, meta)`` batches (rows grouped by text) so that no text spans two chunks:
    the rows of each batch's last text are held back and go with the next batch."""
    carry: Batch | None = None
    for x, meta in batches:
        meta = {k: torch.as_tensor(v) for k, v in meta.items()}
        x = torch.as_tensor(x)
        if carry is not None:
            x = torch.cat([carry[0], x])
            meta = {k: torch.cat([carry[1][k], v]) for k, v in meta.items()}
        if x.shape[0] == 0:
            continue
        other = (meta["text_id"] != meta["text_id"][-1]).nonzero()
        cut = int(other.max()) + 1 if other.numel() else 0  # where the last text's rows start
        carry = (x[cut:], {k: v[cut:] for k, v in meta.items()})
        if cut:
            yield x[:cut], {k: v[:cut] for k, v in meta.items()}
    if carry is not None and carry[0].shape[0]:
        yield carry


def collect(
    encode: Callable[[Tensor], Tensor],
    batches: Iterable[Batch],
    d_sae: int,
    settings: RecordSettings,
    *,
    device: Any = "cpu",
    stream: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Partial:
    """One pass over ``batches`` of ``(x [rows, d_in], meta)``: the kept contexts and counts.

    ``encode`` maps activations to latents [rows, d_sae]; ``stream`` picks the random keys
    (give each part of a sharded pass its own). ``progress`` is called with rows done.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(settings.seed * 1_000_003 + stream)
    kept = Partial.empty(d_sae, settings, device)
    for x, meta in whole_texts(batches):
        order = torch.argsort(meta["text_id"] * (int(meta["position"].max()) + 1)
                              + meta["position"], stable=True)  # fmt: skip
        with torch.no_grad():
            latents = encode(x[order].to(device)).float().clamp(min=0)
        kept = update(kept, latents, {k: v[order] for k, v in meta.items()}, settings, gen)
        if progress is not None:
            progress(int(x.shape[0]))
    return kept
