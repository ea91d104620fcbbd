"""One SAE under training: its module, optimiser, counters and curves, and one step of it.

``SAERun`` holds what one SAE of a ``train_many`` call owns (the trainer keeps a list of
them over one shared stream of batches); ``GraphedStep`` replays its whole step as a CUDA
graph. Also the learning-rate schedule (``lr_factor``), the decoder-bias initialisation
(``geometric_median``) and ``TrainResult``. The loop itself, data order, checkpoints and
callbacks are ``trainer.py``'s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import SAEConfig
from .sparse_coder import DeadLatents, ForwardOutput, SparseAutoencoder

logger = logging.getLogger("interpq.core.sae.trainer")

STEP_METRICS = ("loss", "fvu", "mse", "l0", "aux_loss", "sparsity_loss")
"""Per-step values averaged over each logging window (FVU uses each batch's own mean)."""


@dataclass
class TrainResult:
    """A trained SAE (input scale folded in), its final metrics and its curves."""

    sae: SparseAutoencoder
    config: SAEConfig
    metrics: dict[str, float]
    """Last logging window's averages of STEP_METRICS, plus dead_fraction (over the last
    ``dead_window_tokens`` tokens), explained_variance, n_steps, n_tokens, duration_s and
    tokens_per_s (of this process's steps)."""
    curves: dict[str, list[float]] = field(default_factory=dict)
    """One entry per logging window: step, n_tokens, lr, STEP_METRICS, dead_fraction."""
    fire_counts: Tensor | None = None
    """[d_sae] number of training rows on which each latent fired."""
    n_tokens: int = 0


def lr_factor(cfg: SAEConfig, step: int, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` for 0-based ``step``: linear warm-up, then the decay.

    warm-up: (step+1)/lr_warmup_steps; linear decay: (total−step)/decay_steps over the last
    decay_steps steps; cosine: ½(1+cos(π·(step−start)/decay_steps)). The minimum applies.
    """
    factor = 1.0
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        factor = (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_decay != "none":
        decay = cfg.lr_decay_steps
        if decay is None:
            decay = total_steps - min(cfg.lr_warmup_steps, total_steps)
        start = total_steps - decay
        if decay > 0 and step >= start:
            if cfg.lr_decay == "linear":
                factor = min(factor, (total_steps - step) / decay)
            else:
                factor = min(factor, 0.5 * (1 + math.cos(math.pi * (step - start) / decay)))
    return factor


def geometric_median(points: Tensor, *, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """argmin_z Σ_i ‖x_i − z‖ by Weiszfeld iterations (started at the mean): [d]."""
    points = points.to(torch.float64)
    z = points.mean(0)
    for _ in range(max_iter):
        weights = 1.0 / (points - z).norm(dim=1).clamp_min(1e-12)
        z_next = (weights[:, None] * points).sum(0) / weights.sum()
        moved = float((z_next - z).norm())
        z = z_next
        if moved <= tol * max(float(z.norm()), 1e-12):
            break
    return z


class SAERun:
    """One SAE under training: module, optimiser, counters, running sums, curves."""

    def __init__(self, cfg: SAEConfig, device: torch.device, total_steps: int):
        self.cfg = cfg
        self.total_steps = total_steps
        self.device = device
        gen = torch.Generator().manual_seed(cfg.seed)
        self.sae = SparseAutoencoder(cfg, device=device, generator=gen)
        self.opt = make_adam(self.sae, cfg, device)
        d_sae = cfg.n_latents
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.fire_total = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.candidates = torch.zeros(0, dtype=torch.int64, device=device)
        self.acc = torch.zeros(len(STEP_METRICS), dtype=torch.float64, device=device)
        self.acc_steps = 0
        self.curves: dict[str, list[float]] = {
            k: [] for k in ("step", "n_tokens", "lr", *STEP_METRICS, "dead_fraction")
        }
        self.uses_aux = cfg.architecture in ("topk", "batchtopk") and cfg.aux_k_coefficient > 0
        self.forward: Callable[..., ForwardOutput] = (
            torch.compile(self.sae) if cfg.compile else self.sae
        )
        self.graph = (
            GraphedStep(self)
            if cfg.cuda_graph and device.type == "cuda" and not cfg.compile
            else None
        )

    def init_from_data(self, x: Tensor) -> None:
        """Input scale, decoder bias and encoder scale from the first batch."""
        cfg, sae = self.cfg, self.sae
        x64 = x.to(torch.float64)
        with torch.no_grad():
            if cfg.normalize_activations == "expected_average_only_in":
                mean_norm = x64.norm(dim=1).mean().clamp_min(1e-12)
                sae.input_scale.fill_(float(math.sqrt(cfg.d_in) / mean_norm))
            xs = x64 * sae.input_scale.to(torch.float64)
            if cfg.b_dec_init == "geometric_median":
                sae.b_dec.copy_(geometric_median(xs))
            elif cfg.b_dec_init == "mean":
                sae.b_dec.copy_(xs.mean(0))
            sae.W_enc.mul_(encoder_init_scale(sae, xs.to(sae.W_dec.dtype)))

    def step(self, x: Tensor, step: int) -> None:
        cfg = self.cfg
        lr = cfg.lr * lr_factor(cfg, step, self.total_steps)  # type: ignore[operator]
        if self.graph is not None and self.graph.run(x, lr):
            self.acc_steps += 1
            return
        for group in self.opt.param_groups:
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self.step_body(x, self.candidates)
        self.acc_steps += 1

    def step_body(self, x: Tensor, candidates: Tensor) -> None:
        """Forward, backward, Adam and counters of one step, all device work (no host sync).

        ``GraphedStep`` captures exactly this as a CUDA graph, with static ``x`` and
        ``candidates`` buffers.
        """
        cfg, sae = self.cfg, self.sae
        dead = None
        if self.uses_aux and candidates.numel() > 0:
            dead = DeadLatents(self.tokens_since_fired >= cfg.dead_window_tokens, candidates)
        out = self.forward(x, dead=dead)
        out.loss.backward()
        if cfg.normalize_decoder:
            sae.remove_gradient_parallel_to_decoder_directions()
        if cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip_norm, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if cfg.normalize_decoder:
                sae.set_decoder_norm_to_unit_norm()
            self.tokens_since_fired.add_(x.shape[0]).masked_fill_(out.fire_counts > 0, 0)
            self.fire_total.add_(out.fire_counts)
            if cfg.architecture == "batchtopk":
                sae.update_batchtopk_threshold(out.latent_acts)
            values = (out.loss, out.fvu, out.mse, out.l0, out.aux_loss, out.sparsity_loss)
            self.acc.add_(torch.stack([v.detach() for v in values]))  # float64 += float32

    def log(self, step: int, n_tokens: int) -> dict[str, float]:
        """Close a logging window: one host copy of the averages; refresh AuxK candidates."""
        cfg = self.cfg
        with torch.no_grad():
            dead = (self.tokens_since_fired >= cfg.dead_window_tokens).to(torch.float64).mean()
            values = torch.cat([self.acc / max(self.acc_steps, 1), dead[None]]).tolist()
            if self.uses_aux:
                # Every latent that can be dead before the next refresh (exact between them).
                horizon = cfg.dead_window_tokens - cfg.log_every_steps * cfg.batch_size
                self.candidates = torch.nonzero(self.tokens_since_fired >= horizon).flatten()
        self.acc.zero_()
        self.acc_steps = 0
        lr = cfg.lr * lr_factor(cfg, step - 1, self.total_steps)  # type: ignore[operator]
        metrics = dict(zip((*STEP_METRICS, "dead_fraction"), values, strict=True))
        for key, value in (("step", step), ("n_tokens", n_tokens), ("lr", lr), *metrics.items()):
            self.curves[key].append(float(value))
        return metrics

    def finish(self, total_steps: int, steps_run: int, duration_s: float) -> TrainResult:
        self.sae.fold_input_scale()
        self.sae.eval()
        metrics = {key: self.curves[key][-1] for key in (*STEP_METRICS, "dead_fraction")}
        n_tokens = total_steps * self.cfg.batch_size
        metrics.update(
            explained_variance=1.0 - metrics["fvu"],
            n_steps=float(total_steps),
            n_tokens=float(n_tokens),
            duration_s=duration_s,
            tokens_per_s=steps_run * self.cfg.batch_size / max(duration_s, 1e-9),
        )
        return TrainResult(
            sae=self.sae,
            config=self.cfg,
            metrics=metrics,
            curves=self.curves,
            fire_counts=self.fire_total.cpu(),
            n_tokens=n_tokens,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "sae": self.sae.state_dict(),
            "optimizer": self.opt.state_dict(),
            "tokens_since_fired": self.tokens_since_fired,
            "fire_total": self.fire_total,
            "candidates": self.candidates,
            "acc": self.acc,
            "acc_steps": self.acc_steps,
            "curves": self.curves,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        # the schedule sets the lr before every step: keep this run's own lr holders (a
        # device tensor that a graphed step reads), not the checkpoint's (loaded to the CPU,
        # where a CUDA graph would bake the lr of its capture into every replay)
        lrs = [group["lr"] for group in self.opt.param_groups]
        self.opt.load_state_dict(state["optimizer"])
        for group, lr in zip(self.opt.param_groups, lrs, strict=True):
            group["lr"] = lr
        if self.graph is not None:
            self.graph.reset()
        for name in ("tokens_since_fired", "fire_total", "candidates", "acc"):
            setattr(self, name, state[name].to(self.device))
        self.acc_steps = int(state["acc_steps"])
        self.curves = {k: list(v) for k, v in state["curves"].items()}


class GraphedStep:
    """One SAE's training step captured as a CUDA graph and replayed.

    Launching the ~150 small kernels of a step from Python costs about as much as running
    them; a replay launches them all at once. The graph reads the batch from a static
    buffer (copied in before each replay), the learning rate from the optimiser's device
    tensor, and the AuxK candidate ids from a static buffer; everything else it touches
    (parameters, Adam state, counters, metric sums) is updated in place. The candidate set
    changes size at log refreshes: then the next step runs eagerly and the one after is
    captured again. The first ``WARMUP`` steps run eagerly (lazy initialisation of cuBLAS,
    cuSPARSE and the Adam state must not happen inside a capture). If a capture fails
    (an operation that synchronises with the host), training goes on eagerly.
    """

    WARMUP = 3

    def __init__(self, run: SAERun):
        self.run_ = run
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key = -1
        self.eager_steps = 0
        self.disabled = False
        self.static_x: Tensor | None = None
        self.static_candidates: Tensor | None = None

    def reset(self) -> None:
        self.graph = None
        self.key = -1
        self.eager_steps = 0

    def run(self, x: Tensor, lr: float) -> bool:
        """Run this step through the graph; False: the caller runs it eagerly."""
        if self.disabled:
            return False
        run = self.run_
        key = int(run.candidates.numel()) if run.uses_aux else 0
        if self.graph is None or key != self.key:
            if self.graph is not None:  # the candidate set changed size: capture again
                self.graph, self.key = None, -1
                self.eager_steps = min(self.eager_steps, self.WARMUP - 1)
            if not x.is_cuda:
                return False
            self._set_lr(lr)
            if self.eager_steps < self.WARMUP:
                self._eager_on_side_stream(x)
                return True
            self._capture(x, key)
            if self.graph is None:
                return False
        assert self.graph is not None and self.static_x is not None
        self.static_x.copy_(x)
        if key:
            assert self.static_candidates is not None
            self.static_candidates.copy_(run.candidates)
        self._set_lr(lr)
        self.graph.replay()
        return True

    def _set_lr(self, lr: float) -> None:
        for group in self.run_.opt.param_groups:
            if not isinstance(group["lr"], Tensor):  # e.g. a checkpoint written on the CPU
                group["lr"] = torch.tensor(float(group["lr"]), device=self.run_.device)
            group["lr"].fill_(lr)

    def _eager_on_side_stream(self, x: Tensor) -> None:
        """A warm-up step on a side stream, as CUDA graph capture wants (lazy inits)."""
        self.eager_steps += 1
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            self.run_.step_body(x, self.run_.candidates)
        torch.cuda.current_stream(x.device).wait_stream(side)

    def _capture(self, x: Tensor, key: int) -> None:
        run = self.run_
        self.static_x = x.detach().clone()
        self.static_candidates = run.candidates.clone() if key else run.candidates[:0].clone()
        run.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                run.step_body(self.static_x, self.static_candidates)
        except RuntimeError as exc:  # something in the step synchronises with the host
            logger.warning("CUDA graph capture failed, training on eagerly: %s", exc)
            run.opt.zero_grad(set_to_none=True)
            self.disabled = True
            return
        self.graph, self.key = graph, key


def encoder_init_scale(sae: SparseAutoencoder, xs: Tensor, max_rows: int = 4096) -> float:
    """Least-squares c for W_enc ← c·W_enc on scaled rows xs: argmin_c Σ‖(x−b) − c·x̂‖².

    With b_enc = 0 the latents are positively homogeneous in W_enc, so scaling changes no
    selection, only magnitudes: the SAE starts at its best FVU for the initial directions
    instead of overshooting (k unit directions with O(1) activations each).
    """
    with torch.no_grad():
        xc = xs[:max_rows] - sae.b_dec  # [rows, d_in]
        pre = xc @ sae.W_enc.T + sae.b_enc  # [rows, d_sae]
        arch = sae.cfg.architecture
        if arch == "topk":
            vals, idx = pre.topk(sae.cfg.k, dim=-1, sorted=False)
            latents = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        elif arch == "batchtopk":
            flat = pre.relu().flatten()
            top = flat.topk(min(sae.cfg.k * pre.shape[0], flat.numel()), sorted=False)
            latents = torch.zeros_like(flat).scatter_(0, top.indices, top.values).view_as(pre)
        else:
            latents = pre.relu()
        recon = latents @ sae.W_dec  # [rows, d_in]
        denom = float(recon.pow(2).sum())
        c = float((xc * recon).sum()) / denom if denom > 0 else 1.0
    return c if c > 0 else 1.0


def make_adam(sae: SparseAutoencoder, cfg: SAEConfig, device: torch.device) -> torch.optim.Adam:
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    if cfg.cuda_graph and device.type == "cuda" and not cfg.compile:
        # Graph-safe Adam: step counters and the learning rate live on the device, so a
        # captured step reads the lr written before each replay.
        assert cfg.lr is not None
        kwargs.update(lr=torch.tensor(cfg.lr, device=device), capturable=True)
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.Adam(sae.parameters(), fused=True, **kwargs)
        except (RuntimeError, ValueError):  # fused kernel missing for this device / dtype
            pass
    return torch.optim.Adam(sae.parameters(), foreach=True, **kwargs)
