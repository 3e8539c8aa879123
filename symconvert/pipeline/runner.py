"""Recipes (SPEC §8): one YAML file names a whole convert → finetune → report run.

    recipe = load_recipe("recipes/quickstart.yaml", overrides=["finetune.epochs=3"])
    result = run(recipe, overwrite=True)        # writes recipe.out (the run directory)

Loading and validating a recipe (``load_recipe``, ``--set`` overrides, ``resolve``) is
``symconvert.pipeline.load``; this module runs one. ``run`` calls the library API the CLI
calls (``symconvert.convert`` with the selection keywords,
``symconvert.train.run.finetune``, ``symconvert.report.build``).

The run directory::

    OUT/recipe.yaml                 the resolved recipe (every default filled in)
    OUT/run.log                     what ran, with timings
    OUT/converted/                  symconvert convert's directory (+ plan.json)
    OUT/finetuned/                  symconvert finetune's directory (+ metrics.jsonl, checkpoint)
    OUT/report.json, report.md, report.png
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from symconvert.checks import resolve_device
from symconvert.errors import RecipeError, SymconvertError
from symconvert.io.checkpoint import check_writable
from symconvert.io.files import WEIGHTS_NAME, atomic_write_text, output_dir, wrote
from symconvert.io.metadata import trust_code_default, trusting_code
from symconvert.pipeline.load import (
    check_data,
    dump_yaml,
    recipe_origin,
    resolve,
    trainer_config,
)
from symconvert.pipeline.schema import Recipe
from symconvert.pipeline.stages import (
    REPORT_STEM,
    check_model,
    convert_stage,
    finetune_stage,
    report_stage,
)
from symconvert.tasks import task_for_data
from symconvert.train.distributed import setup_distributed

RECIPE_NAME = "recipe.yaml"
LOG_NAME = "run.log"
CONVERTED_DIR = "converted"
FINETUNED_DIR = "finetuned"
#: Everything ``run`` writes into the run directory; ``--overwrite`` removes only these.
RUN_ARTIFACTS = (RECIPE_NAME, LOG_NAME, CONVERTED_DIR, FINETUNED_DIR, "compare",
                 f"{REPORT_STEM}.json", f"{REPORT_STEM}.md", f"{REPORT_STEM}.png")


# ------------------------------------------------------------------------------- run


@dataclass
class StagePlan:
    name: str
    does: str
    writes: str


def stages(recipe: Recipe) -> list[StagePlan]:
    """What ``run`` will do, stage by stage (``--dry-run`` prints this)."""
    out = recipe.run_dir
    m = recipe.model
    weights = f"weights {m.weights}" if m.weights else ("pretrained" if m.pretrained
                                                        else "random init")
    plan = [StagePlan("convert", f"{m.name} ({weights}) with {recipe.scheme}",
                      str(out / CONVERTED_DIR))]
    if recipe.finetune.enabled:
        cfg = trainer_config(recipe)
        teacher = (f", distilled from {recipe.finetune.teacher or 'the source'}"
                   if cfg.distill else "")
        plan.append(StagePlan(
            "finetune", f"on {recipe.data.spec}: {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, {cfg.opt} lr {cfg.lr:g}, "
            f"{cfg.sched} schedule, batch {cfg.batch_size}{teacher}", str(out / FINETUNED_DIR)))
    files = [f"{REPORT_STEM}.{'md' if f == 'markdown' else f}" for f in recipe.report.formats]
    if recipe.report.plot:
        files.append(f"{REPORT_STEM}.png")
    compare = f", compared with {' and '.join(recipe.report.compare)}" if recipe.report.compare \
        else ""
    measured = f"{task_for_data(recipe.data.spec).score_title} on {recipe.data.spec}"
    plan.append(StagePlan("report", f"{measured}{compare}",
                          ", ".join(str(out / f) for f in files) or "(printed only)"))
    return plan


@dataclass
class DryRun:
    """What ``run`` would do, found without writing anything."""

    resolved: dict[str, Any]
    stages: list[StagePlan]
    plan: Any | None  # symconvert.Plan when the model could be built
    problems: list[str]


def dry_run(recipe: Recipe, *, overwrite: bool = False, resume: bool = False,
            build_model: bool = True) -> DryRun:
    """The resolved recipe, the stages and (``build_model``) the layer plan of the
    conversion; ``problems`` lists what would stop the real run (each naming its key)."""
    resolved = resolve(recipe)
    problems: list[str] = []
    try:
        check_data(recipe)
    except RecipeError as exc:
        problems.append(str(exc))
    try:
        _check_out(recipe, overwrite, resume)
    except SymconvertError as exc:
        problems.append(str(exc))
    plan = None
    if build_model:
        try:
            plan = check_model(recipe)[1]
        except RecipeError as exc:
            problems.append(str(exc))
        except SymconvertError as exc:
            problems.append(f"model: {exc}")
    return DryRun(resolved=resolved, stages=stages(recipe), plan=plan, problems=problems)


@dataclass
class RunResult:
    """What ``run`` leaves behind."""

    out: Path
    converted: Path
    finetuned: Path | None
    report: dict[str, Any]
    files: dict[str, Path]
    seconds: dict[str, float]


class _Log:
    """``OUT/run.log``: one timestamped line per event (rank 0 only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        if self.path is None:
            return
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        new = not self.path.exists()
        with self.path.open("a") as fh:
            fh.write(f"{stamp} {message}\n")
        if new:  # this run's file: removed with the rest if the run fails before converting
            wrote(self.path)


def _check_out(recipe: Recipe, overwrite: bool, resume: bool) -> list[str]:
    """Refuse a run directory that is a file, holds another run (without --overwrite or
    --resume) or, resuming, a run of another recipe; returns the run artifacts present."""
    out = recipe.run_dir
    if out.exists() and not out.is_dir():
        raise RecipeError(f"out: {out} exists and is not a directory")
    present = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    if present and not (overwrite or resume):
        raise RecipeError(
            f"out: {out} already holds a run ({', '.join(present)}); pass --overwrite to "
            f"replace it, --resume to continue it, or --set out=another/dir.")
    if resume and (out / RECIPE_NAME).exists():
        previous = yaml.safe_load((out / RECIPE_NAME).read_text())
        now = resolve(recipe)
        changed = sorted(k for k in set(previous) | set(now)
                         if k not in ("report", "description") and previous.get(k) != now.get(k))
        if changed:
            raise RecipeError(
                f"--resume: the recipe differs from the one in {out / RECIPE_NAME} in "
                f"{', '.join(changed)}; resume with the same recipe, or --overwrite to restart.")
    check_writable(out, overwrite=True)
    return present


def _prepare_out(recipe: Recipe, overwrite: bool, resume: bool) -> Path:
    """``_check_out`` again (under the lock), then, with --overwrite, remove the previous
    run's artifacts (only those: never the user's other files)."""
    out = recipe.run_dir
    present = _check_out(recipe, overwrite, resume)
    if overwrite and not resume:
        for name in present:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _distributed() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _init_group(device: str | None) -> bool:
    """Under torchrun: join the process group early so that rank 0 alone converts and
    reports while the others wait (the trainer reuses the group). True if it created it."""
    dist, _ = setup_distributed(resolve_device(device or "auto"))
    return dist.owns_group


def _broadcast_error(failed: bool) -> bool:
    """True on every rank if any rank failed (so no rank waits forever at a barrier)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return failed
    t = torch.tensor([1.0 if failed else 0.0])
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def run(recipe: Recipe, *, overwrite: bool = False, resume: bool = False,
        progress: bool = True, echo: Callable[[str], None] | None = None) -> RunResult:
    """convert → finetune → report into ``recipe.run_dir``; returns the report and paths.

    Everything ``dry_run`` checks is checked before the run directory is created (the
    data root, the data's task against the model, the selection); a run that fails before
    its converted model is written removes what it wrote. Under ``torchrun`` every rank
    calls this: rank 0 converts and reports, all ranks fine-tune. ``resume`` continues an
    interrupted run in the same directory (same recipe).
    """
    echo = echo or (lambda text: print(text, file=sys.stderr))
    rank, world = _distributed()
    main = rank == 0
    check_data(recipe)
    # the trainer's own checks (finite, in-range options) run here, before the run
    # directory exists
    resolved = resolve(recipe)
    owns_group = _init_group(recipe.finetune.device)

    def leave_group() -> None:
        # After fine-tuning rank 0 works alone: the report's evaluation must not all-reduce
        # with ranks that have finished.
        nonlocal owns_group
        if owns_group:
            torch.distributed.destroy_process_group()
            owns_group = False

    # the recipe's own py: model was named by the user, so its directories may rebuild it;
    # the run directory is locked against a second concurrent run
    trusted = trust_code_default() or str(recipe.model.name).startswith("py:")
    converted = recipe.run_dir / CONVERTED_DIR / WEIGHTS_NAME
    try:
        with trusting_code(trusted):
            model = _on_rank0(main, lambda: _validate(recipe, overwrite, resume))
            with output_dir(recipe.run_dir, enabled=main, keep_partial=converted.exists):
                return _run(recipe, resolved, overwrite, resume, progress, echo, main,
                            leave_group, model)
    finally:
        leave_group()


def _validate(recipe: Recipe, overwrite: bool, resume: bool) -> Any:
    """What ``dry_run`` checks, before the run directory is created: the directory, then
    the model against the data and the selection. Returns the source model."""
    _check_out(recipe, overwrite, resume)
    return check_model(recipe)[0]


def _on_rank0(main: bool, work: Callable[[], Any], log: Callable[[str], None] | None = None
              ) -> Any:
    """``work()`` on rank 0 (its error logged); every rank learns whether it failed, so
    that none waits at a barrier for ever."""
    failed: BaseException | None = None
    result = None
    if main:
        try:
            result = work()
        except BaseException as exc:  # noqa: BLE001  (told to the other ranks, then raised)
            failed = exc
            if log is not None:
                log(f"failed: {type(exc).__name__}: {exc}")
    if _broadcast_error(failed is not None):
        if failed is not None:
            raise failed
        raise RecipeError("rank 0 stopped the run; see its error")
    return result


def _run(recipe: Recipe, resolved: dict[str, Any], overwrite: bool, resume: bool,
         progress: bool, echo: Callable[[str], None], main: bool,
         leave_group: Callable[[], None], model: Any) -> RunResult:
    seconds: dict[str, float] = {}
    out = _on_rank0(main, lambda: _prepare_out(recipe, overwrite, resume)) or recipe.run_dir
    log = _Log(out / LOG_NAME if main else None)
    converted = out / CONVERTED_DIR
    finetuned = out / FINETUNED_DIR
    if main:
        atomic_write_text(out / RECIPE_NAME, f"# resolved by symconvert run from "
                          f"{recipe_origin(recipe)}\n" + dump_yaml(resolved))
        log(f"run {recipe_origin(recipe)} → {out}" + (" (resume)" if resume else ""))

    # 1. convert (rank 0; the others wait in _broadcast_error)
    t0 = time.perf_counter()
    _on_rank0(main, lambda: _convert_step(recipe, converted, resume, echo, log, model), log)
    seconds["convert"] = time.perf_counter() - t0

    # 2. finetune (every rank)
    report_dir = converted
    if recipe.finetune.enabled:
        seconds["finetune"] = finetune_stage(recipe, converted, finetuned, resume, progress,
                                             echo, log, main)
        report_dir = finetuned

    # 3. report (rank 0, alone)
    leave_group()
    report: dict[str, Any] = {}
    files: dict[str, Path] = {}
    if main:
        t0 = time.perf_counter()
        echo("report: measuring source, converted and fine-tuned models")
        report, files = report_stage(recipe, report_dir, out,
                                     log=lambda msg: echo(f"report: {msg}"))
        seconds["report"] = time.perf_counter() - t0
        log(f"report: wrote {', '.join(str(p.name) for p in files.values())}")
        log("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return RunResult(out=out, converted=converted,
                     finetuned=finetuned if recipe.finetune.enabled else None,
                     report=report, files=files, seconds=seconds)


def _convert_step(recipe: Recipe, converted: Path, resume: bool, echo: Callable[[str], None],
                  log: _Log, model: Any) -> None:
    """Rank 0 converts ``model`` (or, resuming, reuses the converted directory)."""
    if resume and (converted / WEIGHTS_NAME).exists():
        echo(f"convert: reusing {converted}")
        log("convert: reused")
        return
    echo(f"convert: {recipe.model.name} with {recipe.scheme} → {converted}")
    plan = convert_stage(recipe, converted, model)
    log(f"convert: {plan['converted']} layers converted, parameters "
        f"{plan['params']['before']:,} → {plan['params']['after']:,}")


__all__ = ["DryRun", "RunResult", "StagePlan", "dry_run", "run", "stages"]
