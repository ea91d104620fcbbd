"""The result of a patching sweep: a labelled grid of metric values, one cell per patch.

Axes are layers × positions (× heads for ``head_out``). A sweep that patches every position at
once has a single position column labelled ``"all"``. Values are means over the prompts; the
per-prompt values are kept too (in a ``.npz`` beside the JSON when :meth:`PatchGrid.save`
writes the grid). ``recovery`` is the normalised metric
``(patched - corrupted) / (clean - corrupted)`` of the prompt means of the primary metric.

Plain numpy and JSON; no torch, no plotting.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from interpq.core.atomic import write_atomic
from interpq.core.uris import local_path

SCHEMA_VERSION = 1
PER_PROMPT_SUFFIX = ".per_prompt.npz"
"""What :meth:`PatchGrid.save` appends to the JSON file's stem for the per-prompt arrays."""


@dataclass
class PatchGrid:
    """Metric values per patch, labelled by layer, position (with its tokens) and head."""

    model: str
    """The model's class name (or the name the caller gave)."""
    component: str
    """``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` or ``head_out``."""
    direction: Literal["denoising", "noising"]
    """Denoising patches clean activations into the corrupted run; noising the reverse."""
    mode: Literal["exact", "attribution", "reference"]
    """``exact`` (fast engine), ``attribution`` (gradient estimate), ``reference`` (one full
    forward pass per patch, for checking)."""
    layers: list[int]
    positions: list[int] | None
    """Patched positions, one column each; None when all positions were patched at once."""
    position_labels: list[str]
    """Per column, the first prompt's token there (``clean→corrupted`` where they differ)."""
    heads: list[int] | None
    """Heads (``head_out`` only)."""
    primary: str
    """The metric ``recovery`` is normalised from."""
    values: dict[str, np.ndarray]
    """Metric -> ``[layers, positions]`` or ``[layers, positions, heads]``, mean over prompts."""
    per_prompt: dict[str, np.ndarray]
    """Metric -> the same axes plus a last axis over prompts (no ``recovery``)."""
    clean: dict[str, float]
    """Prompt means of each metric on the unpatched clean run."""
    corrupted: dict[str, float]
    """Prompt means of each metric on the unpatched corrupted run."""
    n_prompts: int
    n_forward_passes: int
    """Forward passes run (packed or partial passes count one each; the backward counts one)."""
    tokens: list[list[str]] = field(default_factory=list)
    """The clean prompts' tokens."""
    correlation: float | None = None
    """Attribution mode with ``verify_top_k``: Pearson correlation of the estimated and the
    exactly patched primary metric over the re-checked cells (after :meth:`merge`: over the
    re-checked cells of all the merged grids)."""
    verified: list[dict[str, Any]] | None = None
    """Attribution mode with ``verify_top_k``: the re-checked cells, estimate and exact value.
    ``verify_top_k`` applies per sweep, so a grid merged from n chunks holds up to n·k cells
    (each chunk's top k among its own layers)."""
    schema_version: int = SCHEMA_VERSION

    @property
    def shape(self) -> tuple[int, ...]:
        return next(iter(self.values.values())).shape

    def cell(self, index: tuple[int, ...]) -> dict[str, Any]:
        """Labels of one cell: layer, position, token and head."""
        li, pi = index[0], index[1]
        row: dict[str, Any] = {
            "layer": self.layers[li],
            "position": None if self.positions is None else self.positions[pi],
            "token": self.position_labels[pi],
        }
        if self.heads is not None:
            row["head"] = self.heads[index[2]]
        return row

    def largest_effect(self) -> dict[str, Any] | None:
        """The cell whose patch moved the primary metric furthest from the unpatched base run
        (the corrupted run when denoising, the clean run when noising), with its labels (layer,
        position, token, head), its value and recovery. Ranked by the distance of its recovery
        from the base run's (0 denoising, 1 noising); by the distance of its value from the base
        run's value where clean and corrupted agree (recovery undefined). None if every cell is
        NaN."""
        value = np.asarray(self.values[self.primary], dtype=float)
        rec = self.values.get("recovery")
        base = self.corrupted if self.direction == "denoising" else self.clean
        if rec is not None and not np.all(np.isnan(rec)):
            effect = np.abs(np.asarray(rec, dtype=float) - base["recovery"])
            ranked_by = "recovery"
        else:
            effect = np.abs(value - base[self.primary])
            ranked_by = self.primary
        if effect.size == 0 or np.all(np.isnan(effect)):
            return None
        index = np.unravel_index(int(np.nanargmax(effect)), effect.shape)
        row = {"head": None, **self.cell(tuple(int(i) for i in index))}
        row.update(
            {
                "metric": self.primary,
                "value": _num(value[index]),
                "recovery": None if rec is None else _num(rec[index]),
                "ranked_by": f"|{ranked_by} - {self.direction} base run's|",
            }
        )
        return row

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per patch: its labels and the prompt mean of every metric."""
        rows = []
        for index in np.ndindex(*self.shape):
            row = self.cell(index)
            row.update({m: _num(v[index]) for m, v in self.values.items()})
            rows.append(row)
        return rows

    def to_dict(self, per_prompt: bool = True) -> dict[str, Any]:
        """Every field as JSON-ready values (NaN and infinities as None), in field order; the
        arrays converted whole, not number by number (a 256-prompt sweep's ``per_prompt`` is
        ~500,000 numbers). ``per_prompt=False`` leaves that field out."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "per_prompt" and not per_prompt:
                continue
            value = getattr(self, f.name)
            if f.name in ("values", "per_prompt"):
                out[f.name] = {m: _json_array(v) for m, v in value.items()}
            else:
                out[f.name] = _clean_json(value)
        return out

    def to_json(self, **kwargs: Any) -> str:
        """The whole grid as JSON (NaN written as null), every prompt's values included."""
        return json.dumps(self.to_dict(), **kwargs)

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write the grid to ``path`` as JSON, and its per-prompt values beside it as numpy
        arrays (``<stem>.per_prompt.npz``, one array per metric: the grid's axes plus one over
        the prompts, in the sweep's dtype); the JSON names that file (``per_prompt_file``) in
        place of the numbers. :meth:`from_json` given the path reads both back.

        Why two files: a 256-prompt sweep has ~400,000 per-prompt numbers; written as JSON
        text they made an 8 MB file that took longer to format than the sweep took on a GPU.
        Both files are written atomically, the arrays first. Returns both paths."""
        path = Path(path)
        arrays = path.with_name(path.stem + PER_PROMPT_SUFFIX)
        npz = io.BytesIO()
        np.savez(npz, **{m: np.asarray(v) for m, v in self.per_prompt.items()})
        write_atomic(arrays, npz.getvalue())
        write_atomic(path, json.dumps({**self.to_dict(per_prompt=False),
                                       "per_prompt_file": arrays.name}))  # fmt: skip
        return path, arrays

    @classmethod
    def merge(cls, grids: list[PatchGrid]) -> PatchGrid:
        """One grid from sweeps of the same prompts split by layers (e.g. run on several
        workers): layers are concatenated in order, forward passes added up; attribution
        grids keep the re-checked cells of every part, and the correlation is recomputed over
        all of them."""
        if not grids:
            raise ValueError("nothing to merge")
        first = grids[0]
        same = ("model", "component", "direction", "mode", "positions", "heads", "primary")
        for g in grids[1:]:
            for key in same:
                if getattr(g, key) != getattr(first, key):
                    raise ValueError(f"cannot merge grids whose {key} differ")
            if not (_close(g.clean, first.clean) and _close(g.corrupted, first.corrupted)):
                raise ValueError("cannot merge grids of different prompts (baselines differ)")
        order = sorted(range(len(grids)), key=lambda i: grids[i].layers[0])
        parts = [grids[i] for i in order]
        layers = [layer for g in parts for layer in g.layers]
        if len(set(layers)) != len(layers):
            raise ValueError("cannot merge grids with overlapping layers")
        return cls(
            **{
                **asdict(first),
                "layers": layers,
                "values": {m: np.concatenate([g.values[m] for g in parts]) for m in first.values},
                "per_prompt": {
                    m: np.concatenate([g.per_prompt[m] for g in parts]) for m in first.per_prompt
                },
                "n_forward_passes": sum(g.n_forward_passes for g in parts),
                **_merge_verified(parts),
            }
        )

    @classmethod
    def from_json(cls, source: str | Path) -> PatchGrid:
        """A grid from its JSON text, or from the file holding it: a path or the ``file://``
        URI a job's result gives (``result["grid"]``). A grid :meth:`save` wrote keeps its
        per-prompt values in a file beside the JSON: give its path or URI, not its text."""
        text, path = str(source), None
        if isinstance(source, Path) or not text.lstrip().startswith("{"):
            path = local_path(source)
            text = path.read_text()
        data = json.loads(text)
        data["values"] = {m: np.array(v, dtype=float) for m, v in data["values"].items()}
        arrays = data.pop("per_prompt_file", None)
        if arrays is None:
            data["per_prompt"] = {
                m: np.array(v, dtype=float) for m, v in data["per_prompt"].items()
            }
        elif path is None:
            raise ValueError(f"this grid's per-prompt values are in {arrays!r} beside its JSON "
                             "file: read the grid from that file's path or URI, not its text")  # fmt: skip
        else:
            with np.load(path.with_name(arrays)) as npz:
                data["per_prompt"] = {m: npz[m] for m in npz.files}
        return cls(**data)


def _merge_verified(parts: list[PatchGrid]) -> dict[str, Any]:
    """``verified`` and ``correlation`` of merged grids: every part's re-checked cells, and the
    Pearson correlation of estimate and exact value over all of them."""
    if all(g.verified is None for g in parts):
        return {"verified": None, "correlation": None}
    rows = [row for g in parts for row in g.verified or []]
    est = np.array([r["attribution"] for r in rows], dtype=float)
    exact = np.array([r["exact"] for r in rows], dtype=float)
    ok = ~(np.isnan(est) | np.isnan(exact))
    est, exact = est[ok], exact[ok]
    if len(est) < 3 or np.std(est) == 0 or np.std(exact) == 0:
        return {"verified": rows, "correlation": None}
    return {"verified": rows, "correlation": float(np.corrcoef(est, exact)[0, 1])}


def _close(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-6)
        or (math.isnan(a[k]) and math.isnan(b[k]))
        for k in a
    )


def _num(x: Any) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def _json_array(a: Any) -> Any:
    """``a`` as nested lists, NaN and infinities as None (what ``_clean_json`` makes of them)."""
    a = np.asarray(a)
    if a.dtype.kind != "f":
        return _clean_json(a.tolist())
    finite = np.isfinite(a)
    if finite.all():
        return a.tolist()
    obj = a.astype(object)
    obj[~finite] = None
    return obj.tolist()


def _clean_json(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if np.isnan(obj) or np.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean_json(v) for v in obj]
    return obj
