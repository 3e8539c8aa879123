"""Calibrated conversion: fit every converted layer so that it reproduces the source
layer's *output* on a few hundred real inputs (post-training calibration, as GPTQ /
AdaRound do for quantisation).

Layers are fitted one after another in forward order (sequential): for the layer being
fitted, the input is what the *converted* model (all earlier layers already fitted) feeds
it, and the target is what the *source* model's same layer outputs on the same images.
Each layer is affine in its weight, so the fit is a least-squares problem

    min_{P, b} || [unpack(P) | b] X - Y ||²

that only needs the float64 moments H = X Xᵀ, C = Y Xᵀ and ||Y||², accumulated batch by
batch (no activations are kept). For a scheme whose ``unpack`` is linear (every scheme but
``eigen:K``) the normal equations Jᵀ(J(P) H) = Jᵀ C are solved by preconditioned
conjugate gradients in the scheme's own packed space, the adjoint Jᵀ of ``unpack`` being
autograd's vector-Jacobian product; ``eigen:K`` takes L-BFGS steps on the same objective.

Convolutions (1d/2d/3d, grouped and depthwise) are seen through their im2col columns
(one moment matrix per group), linears with every token/position as a row, LSTM/GRU gate
blocks with the input sequence (``weight_ih``) or previous hidden states (``weight_hh``).

Then, block by block (``steps`` > 0, the default), every *block* (a residual block, a
transformer layer) whose layers have just been fitted is refined as a whole to reproduce the
source block's output (``symconvert.surgery.calib_blocks``), so that layers make up for each
other's error. BatchNorm running statistics outside the refined blocks are re-estimated on
the calibration set afterwards (inside them, the refined affine parameters were fitted to
the source's statistics).

Before the fits, square ``channel`` convs feeding a BatchNorm get the output signs that
bring them nearest symmetric (``calib_gauge``: a function-preserving flip of the source).
This module is the public API; hooks, units and moments: ``calib_moments``; solvers:
``calib_solve``; blocks: ``calib_blocks``; costs: ``calib_costs``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from symconvert.checks import resolve_device
from symconvert.surgery.calib_blocks import (
    DEFAULT_LR,
    DEFAULT_STEPS,
    Block,
    BlockData,
    RefineOptions,
    called_once,
    capture,
    find_blocks,
    probe_chains,
    refine_block,
)
from symconvert.surgery.calib_gauge import sign_gauge
from symconvert.surgery.calib_moments import (
    CalibrationError,
    Feed,
    Stop,
    Unit,
    calibration_mode,
    find_units,
    fittable,
    forward_order,
    run_model,
)
from symconvert.surgery.calib_solve import DEFAULT_DAMP, SolveOptions, fit_mha, fit_rnn, fit_unit

__all__ = ["CalibrationError", "CalibrationResult", "calibrate", "calibration_batches",
           "calibration_record", "reestimate_batchnorm", "register_data_resolver"]

#: functions that turn calibration data given as a ``--data`` spec (or loaders) into
#: (batches, text); ``symconvert.tasks.data`` registers the one for ``--data`` specs
DataResolver = Callable[[Any, "nn.Module | None", int, int], "tuple[Iterable, str] | None"]
_RESOLVERS: list[DataResolver] = []


def register_data_resolver(fn: DataResolver) -> DataResolver:
    """Register ``fn(data, model, batch_size, seed) -> (iterable of batches, text) | None``
    (None: not this kind of data); used by ``calibration_batches`` for data it cannot
    iterate itself (a ``--data`` spec string)."""
    _RESOLVERS.append(fn)
    return fn


# ----------------------------------------------------------------------------- data


def calibration_batches(data_or_loader: Any, samples: int = 512, *, model: nn.Module | None = None,
                        batch_size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """The calibration inputs: the first ``samples`` inputs of ``data_or_loader``, kept as
    a list of input batches (inputs only, never activations).

    ``data_or_loader`` is a ``--data`` spec string (the train split, no augmentation), a
    ``Loaders`` (its ``train`` loader), a DataLoader or any iterable of batches (a batch is
    a tensor or a tuple/list whose first item is the input), or one input tensor.
    """
    if samples < 1:
        raise CalibrationError(f"--calibration-samples must be >= 1, got {samples}.")
    source = data_or_loader
    for resolve in _RESOLVERS:
        got = resolve(source, model, batch_size, seed)
        if got is not None:
            source = got[0]
            break
    else:
        if isinstance(source, str):
            raise CalibrationError(f"calibration data {source!r}: a --data spec needs "
                                   "symconvert.tasks (import symconvert).")
    if isinstance(source, torch.Tensor):
        source = source.split(batch_size)
    out: list[torch.Tensor] = []
    seen = 0
    for batch in source:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise CalibrationError(f"calibration batches must hold tensors, got {type(x).__name__}.")
        x = x[: samples - seen]
        out.append(x)
        seen += len(x)
        if seen >= samples:
            break
    if not out:
        raise CalibrationError("the calibration data yielded no batch.")
    return out


def _data_text(data_or_loader: Any) -> str:
    if isinstance(data_or_loader, str):
        return data_or_loader
    text = getattr(data_or_loader, "text", None) or getattr(getattr(data_or_loader, "spec", None), "text", None)
    return text if isinstance(text, str) else type(data_or_loader).__name__


# ----------------------------------------------------------------------------- progress


class _Progress:
    """A rich progress bar on a terminal, plain log lines otherwise."""

    def __init__(self, total: int, enabled: bool | None, title: str) -> None:
        self.console = Console(stderr=True)
        self.enabled = True if enabled is None else enabled
        self.total, self.done, self.title = total, 0, title
        self.bar = None
        if self.enabled and self.console.is_terminal:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=self.console, transient=False)
            self.task = self.bar.add_task(title, total=total)
            self.bar.start()

    def step(self, name: str, naive: float | None, fitted: float | None) -> None:
        self.done += 1
        if not self.enabled:
            return
        detail = ""
        if naive is not None and fitted is not None:
            detail = f" output error {naive:.3f} -> {fitted:.3f}"
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"{self.title}: {name}")
        else:
            print(f"calibrate [{self.done}/{self.total}] {name}{detail}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A line of its own (a block refined), above the bar on a terminal."""
        if self.bar is not None:
            self.bar.console.print(text)
        elif self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------------------- results


@dataclass
class CalibrationResult:
    """What ``calibrate`` did: per layer the relative output error of the nearest symmetric
    (naive) weight and of the fitted one, on the same inputs."""

    samples: int
    data: str
    layers: dict[str, dict[str, float]]
    batchnorm: int  # BatchNorm layers whose statistics were re-estimated
    seconds: float
    damp: float = DEFAULT_DAMP
    steps: int = 0  # Adam steps per block (0: layer-wise only)
    #: per refined block: relative output error after the layer-wise fits and after refining
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str = "cpu"  # where it computed
    cache_mib: float = 0.0  # the largest block-input cache held in memory (both models)
    gauge: dict[str, Any] = field(default_factory=dict)  # calib_gauge.sign_gauge's record

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "data": self.data, "damp": self.damp,
                "steps": self.steps, "batchnorm_reestimated": self.batchnorm,
                "seconds": round(self.seconds, 2), "device": self.device, "gauge": self.gauge,
                "cache_mib": self.cache_mib, "blocks": self.blocks, "layers": self.layers}


# ----------------------------------------------------------------------------- calibrate


def calibrate(model: nn.Module, source_model: nn.Module, data_or_loader: Any, samples: int = 512, *,
              batch_size: int = 64, plan: Any = None, batchnorm: bool = True,
              max_iter: int = 50, tol: float = 1e-9, rel_tol: float = 5e-3, eigen_steps: int = 60,
              damp: float = DEFAULT_DAMP, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
              device: str | torch.device | None = None, blocks: str | None = None,
              progress: bool | None = None, seed: int = 0, gauge: bool = True) -> CalibrationResult:
    """Fit the converted layers of ``model`` (in place) to reproduce ``source_model``'s
    layer outputs on ``samples`` inputs, in forward order; refine every block (``steps`` Adam
    steps each; 0: layer-wise only) to reproduce the source block's output; re-estimate the
    BatchNorm statistics outside the refined blocks. ``source_model``: the unconverted model
    (not changed). ``plan``, if given, gets ``output_error`` / ``output_error_naive`` per
    layer and a ``calibration`` record. ``damp`` pulls each fit towards the nearest symmetric
    weight (``damp`` × the layer's mean input energy × ‖W − W₀‖²; 0: plain least squares).
    ``channel`` on linear and 1 × 1 layers (and stacked ``block``) is solved exactly; other
    fits run conjugate gradients until the estimated distance to the optimum is under
    ``rel_tol`` × the squared error, the residual under ``tol`` × its start, or ``max_iter``
    steps. ``device``: where to compute (``"auto"``: CUDA when available; ``None``: where
    ``model`` is). ``blocks`` (a glob or ``re:REGEX``): the modules to refine as blocks.
    ``gauge``: first flip the output signs of square ``channel`` convs feeding a BatchNorm
    (``calib_gauge``). Returns a ``CalibrationResult``."""
    if not (math.isfinite(damp) and damp >= 0):
        raise CalibrationError(f"--calibration-damp must be a finite number >= 0, got {damp}.")
    if steps < 0:
        raise CalibrationError(f"--calibration-steps must be >= 0, got {steps}.")
    opts = SolveOptions(max_iter=max_iter, tol=tol, eigen_steps=eigen_steps, damp=damp,
                        rel_tol=rel_tol)
    refine = RefineOptions(steps=steps, lr=lr, seed=seed, blocks=blocks)
    start = time.perf_counter()
    home = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = home if device is None else resolve_device(device)
    batches = calibration_batches(data_or_loader, samples, model=source_model,
                                  batch_size=batch_size, seed=seed)
    units = find_units(model)
    layers: dict[str, dict[str, Any]] = {}
    for unit in [u for u in units if not fittable(u)]:
        # e.g. nn.MultiheadAttention's in_proj_weight (called functionally inside the
        # attention): kept at the nearest symmetric weight, and the record says so
        units.remove(unit)
        layers[unit.name] = {"output_error": None, "output_error_naive": None,
                             "note": f"not fitted ({type(unit.module).__name__.replace('Parametrized', '')}"
                                     f".{unit.tensor}): kept at the nearest symmetric weight"}
    _require_source_layers(units, source_model)
    blocks: dict[str, dict[str, Any]] = {}
    stats: dict[str, Any] = {}
    with _on_device(device, model, source_model):
        with calibration_mode(model, source_model):
            target, stats["gauge"] = (sign_gauge(model, source_model, units, batches[0], device)
                                      if gauge else (source_model, {}))
            todo = _fit_all(model, target, units, batches, device, opts, refine, progress,
                            layers, blocks, stats)
        skip = {id(m) for b in todo for m in b.module.modules()}
        bn = (reestimate_batchnorm(model, batches, device, skip=skip,
                                   samples=BATCHNORM_SAMPLES) if batchnorm else 0)
    result = CalibrationResult(samples=sum(len(b) for b in batches), data=_data_text(data_or_loader),
                               layers=layers, batchnorm=bn, seconds=time.perf_counter() - start,
                               damp=damp, steps=steps, blocks=blocks, device=device.type,
                               cache_mib=stats.get("cache_mib", 0.0), gauge=stats["gauge"])
    if plan is not None:
        annotate_plan(plan, result)
    return result


@contextmanager
def _on_device(device: torch.device, *models: nn.Module):
    """The models on ``device`` inside the block, back where each was after (error or not)."""
    homes = [next((p.device for p in m.parameters()), device) for m in models]
    try:
        for m in models:
            m.to(device)
        yield
    finally:
        for m, home in zip(models, homes, strict=True):
            m.to(home)


def _require_source_layers(units: list[Unit], source_model: nn.Module) -> None:
    names = {n for n, _ in source_model.named_modules()}
    for unit in units:
        for s in unit.sites:
            if s not in names:
                raise CalibrationError(f"the source model has no layer {s!r}: calibration needs "
                                       "the unconverted model of the same architecture.")


def _fit_all(model, source_model, units, batches, device, opts, refine, progress, layers,
             blocks, stats) -> list[Block]:
    """Every unit's fit in forward order; after a block's last unit, the block's refinement.
    A layer inside a block is fitted on the block's cached inputs, and a block that takes the
    previous block's output gets that block's cached output: the models are run from their
    input once per chain of blocks, not once per layer. Fills ``layers`` and ``blocks``;
    returns the blocks refined."""
    found = find_blocks(model, units, refine.blocks) if units else []
    if refine.blocks is not None and refine.steps > 0 and not found:
        raise CalibrationError(f"--calibration-blocks {refine.blocks!r} matches no module that "
                               "holds converted layers (and only uses them inside itself).")
    calls: dict[str, int] = {}
    if units:
        units, calls = forward_order(model, units, batches[0], device,
                                     also=tuple(b.name for b in found))
    found = called_once(found, calls)
    chains = probe_chains(model, found, batches[0][:2], device) if found else {}
    block_of = {id(u): b for b in found for u in b.units}
    last = {id(max(b.units, key=units.index)): b for b in found}
    feeds_next = set(chains.values())  # blocks whose output is the next block's input
    model_feeds = [Feed(model, source_model, x, device) for x in batches]
    data: BlockData | None = None
    done: tuple[BlockData, list | None] | None = None  # the last block done, its targets
    bar = _Progress(len(units), progress, "calibrate")
    stats["cache_mib"] = 0.0  # the largest block-input cache held
    half = False  # a cache kept in float16 (calib_blocks.COMPACT_FROM_MIB)
    try:
        for unit in units:
            block = block_of.get(id(unit))
            if block is not None and (data is None or data.block is not block):
                data = _block_inputs(model, source_model, block, batches, device, chains, done)
                done = None  # the previous block's cache is not needed any more
                stats["cache_mib"] = max(stats["cache_mib"], data.nbytes() / 2**20)
                half = half or data.compact
            ends = last.get(id(unit)) is not None
            keep = ends and (refine.steps > 0 or block.name in feeds_next)
            record = _fit_one(model, source_model, unit, calls,
                              data.feeds(keep) if block is not None else model_feeds, opts)
            layers[unit.name] = record
            bar.step(unit.name, record.get("output_error_naive"), record.get("output_error"))
            if ends and refine.steps > 0:
                targets = data.targets()
                blocks[block.name] = rec = refine_block(block, data.calls, targets, refine)
                bar.note(f"calibrate block {block.name}: output error "
                         f"{rec['output_error_layerwise']:.3f} -> {rec['output_error']:.3f}")
                done = (data, targets)
            elif ends:
                done = (data, None)  # targets used only if the next block chains
        if stats["cache_mib"]:
            bar.note(f"calibrate: block inputs cached in memory ({device.type}"
                     f"{', float16' if half else ''}), at most {stats['cache_mib']:.0f} MiB "
                     "for both models")
    finally:
        bar.close()
    stats["cache_mib"] = round(stats["cache_mib"], 1)
    return found if refine.steps > 0 else []


def _block_inputs(model, source_model, block: Block, batches, device, chains: dict[str, str],
                  done: tuple[BlockData, list | None] | None) -> BlockData:
    """The block's cached inputs: the previous block's outputs when it chains from it, else
    both models run up to it."""
    if done is not None and chains.get(block.name) == done[0].block.name:
        source_block = dict(source_model.named_modules())[block.name]
        targets = done[1] if done[1] is not None else done[0].targets()
        return done[0].chained(block, source_block, targets)
    return capture(model, source_model, block, batches, device)


def _fit_one(model, source_model, unit: Unit, calls, feeds, opts) -> dict[str, Any]:
    if isinstance(unit.module, nn.MultiheadAttention):
        return fit_mha(model, source_model, unit, calls, feeds, opts)
    if isinstance(unit.module, nn.RNNBase):
        return fit_rnn(model, source_model, unit, feeds, opts)
    return fit_unit(model, source_model, unit, calls, feeds, opts)


def annotate_plan(plan: Any, result: CalibrationResult) -> None:
    """Write the per-layer output errors and the calibration record into ``plan``."""
    for entry in plan.layers:
        rec = result.layers.get(entry.name)
        if rec is not None:
            entry.output_error = rec.get("output_error")
            entry.output_error_naive = rec.get("output_error_naive")
    plan.calibration = {k: v for k, v in result.to_dict().items() if k != "layers"}


# ----------------------------------------------------------------------------- BatchNorm


#: at most this many calibration samples re-estimate the BatchNorm statistics (fvcore's
#: "precise BN" likewise uses a fixed budget): per channel still thousands of values
BATCHNORM_SAMPLES = 256


def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor],
                         device: torch.device | str = "cpu", skip: set[int] | None = None,
                         samples: int | None = None) -> int:
    """Recompute every BatchNorm's running mean/var as the plain average over
    ``batches`` (the first batches holding ``samples``, if given; the rest of the model in
    eval mode), but those whose ``id`` is in ``skip``; each forward stops after the last layer
    re-estimated. Returns the number of layers re-estimated."""
    skip = skip or set()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and id(m) not in skip]
    if not bns:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in bns]
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, *_: order.append(mod)) for m in bns]
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        seen = 0
        for x in batches:
            if samples is not None and seen >= samples:
                break  # whole batches: the cumulative average weighs every batch alike
            seen += len(x)
            run_model(model, x, device)
            if order and len(order) == len({id(m) for m in order}) == len(bns):
                for h in hooks:  # every BatchNorm ran once: later forwards stop after the last
                    h.remove()
                hooks = [order[-1].register_forward_hook(_stop)]
            order.clear()
    finally:
        for h in hooks:
            h.remove()
        for m, mom in momenta:
            m.momentum = mom
        for m, mode in modes:
            m.training = mode
    return len(bns)


def _stop(*_: Any) -> None:
    raise Stop


def calibration_record(plan: Any) -> dict[str, Any]:
    """What a model directory records of its calibration (``symconvert.json`` key
    ``calibration``): the run's settings and per layer the naive and fitted output error."""
    return {**(getattr(plan, "calibration", None) or {}), "layers": {
        e.name: {"output_error": e.output_error, "output_error_naive": e.output_error_naive}
        for e in plan.converted}}


