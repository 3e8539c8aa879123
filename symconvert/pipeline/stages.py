"""The stages of a recipe run, each the library call the CLI makes: ``convert_stage``
(``symconvert.convert`` + ``symconvert.save(plan=, config=)``), ``finetune_stage``
(``symconvert.train.run.finetune``), ``report_stage`` (``build_report`` + the files)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from symconvert.errors import Interrupted, RecipeError, SymconvertError, WeightsError
from symconvert.io.checkpoint import save
from symconvert.io.files import atomic_write_text
from symconvert.models.sources import create_model
from symconvert.pipeline.load import finetune_settings, recipe_origin
from symconvert.pipeline.schema import Recipe
from symconvert.report.build import build_report
from symconvert.report.options import ReportOptions
from symconvert.report.plot import plot_report
from symconvert.report.render import render
from symconvert.surgery.api import convert, inspect
from symconvert.surgery.config import ConvertConfig
from symconvert.surgery.plan import Plan
from symconvert.tasks import check_data
from symconvert.train.run import finetune
from symconvert.train.state import CHECKPOINT_NAME

REPORT_STEM = "report"
Echo = Callable[[str], None]


def build_source(recipe: Recipe) -> nn.Module:
    """The source model the recipe names (``symconvert.create_model``)."""
    m = recipe.model
    try:
        return create_model(m.name, pretrained=m.pretrained, weights=m.weights,
                            num_classes=m.num_classes, **m.kwargs)
    except WeightsError as exc:  # its hint names CLI flags; say the recipe keys too
        raise RecipeError(f"model: {exc} In a recipe: --set model.weights=FILE, or "
                          "--set model.pretrained=false.") from None


def check_model(recipe: Recipe) -> tuple[nn.Module, Plan]:
    """Build the recipe's source model and find, before anything is written, what would stop
    the run later: data (and calibration data) of another task than the model's, a
    selection that converts nothing or a target reduction out of reach. Returns the model
    and its plan (without calibration: nothing is measured)."""
    model = build_source(recipe)
    calibrate = recipe.selection.calibrate
    try:
        check_data(model, recipe.data.spec, flag="data:")
        if isinstance(calibrate, str):
            check_data(model, calibrate, flag="selection.calibrate:")
    except SymconvertError as exc:
        raise RecipeError(f"recipe {recipe_origin(recipe)}: {exc}") from None
    kwargs = recipe.convert_kwargs()
    for key in ("calibrate", "calibration_samples", "calibration_damp", "calibration_mode",
                "calibration_steps", "calibration_blocks", "device"):  # convert-only
        kwargs.pop(key, None)
    return model, inspect(model, recipe.scheme, **kwargs)


def convert_stage(recipe: Recipe, out: Path, model: nn.Module | None = None) -> dict[str, Any]:
    """Convert the source model (``model``, or built now) and write ``out`` (model,
    metadata, plan.json) as ``symconvert convert`` does."""
    config = ConvertConfig.of(recipe.scheme, **recipe.convert_kwargs())
    model, plan = convert(model if model is not None else build_source(recipe), config)
    save(model, out, overwrite=True, plan=plan, config=config)
    return plan.to_dict()


def finetune_stage(recipe: Recipe, converted: Path, finetuned: Path, resume: bool,
                   progress: bool, echo: Echo, log: Echo, main: bool) -> float:
    """``symconvert.train.run.finetune`` of the converted directory, as the CLI calls it; the
    seconds it took."""
    t0 = time.perf_counter()
    settings = finetune_settings(recipe)
    if main:
        echo(f"finetune: on {recipe.data.spec} → {finetuned}")
        log(f"finetune: start ({', '.join(f'{k}={v}' for k, v in settings.items())})")
    try:
        result = finetune(converted, recipe.data.spec, out=finetuned,
                          teacher=recipe.finetune.teacher,
                          resume=resume and (finetuned / CHECKPOINT_NAME).exists(),
                          overwrite=True, progress=progress and main, **settings)
    except BaseException as exc:
        if main:
            log(f"finetune stopped: {type(exc).__name__}: {exc}")
            if isinstance(exc, (KeyboardInterrupt, Interrupted)):
                echo("the last checkpoint is kept: rerun the same command with --resume "
                     "to continue")
        raise
    seconds = time.perf_counter() - t0
    if main:
        log(f"finetune: done in {seconds:.1f}s; eval {result.eval}")
    return seconds


def report_options(recipe: Recipe) -> ReportOptions:
    """The ``ReportOptions`` of this recipe: its ``report`` keys, and the data, input size,
    subsample, device and workers of its ``data`` and ``finetune`` sections."""
    data, ft = recipe.data, recipe.finetune
    kwargs: dict[str, Any] = {name: getattr(recipe.report, name)
                              for name in ReportOptions.names()
                              if name in type(recipe.report).model_fields}
    kwargs.update(data=data.spec, input_size=data.input_size, subsample=data.subsample)
    for key in ("device", "workers"):
        if getattr(ft, key) is not None:
            kwargs[key] = getattr(ft, key)
    try:
        return ReportOptions(**kwargs)
    except SymconvertError as exc:
        raise RecipeError(f"recipe {recipe_origin(recipe)}: report: {exc}") from None


def report_stage(recipe: Recipe, model_dir: Path, out: Path, log: Echo | None = None
                 ) -> tuple[dict[str, Any], dict[str, Path]]:
    """Build the report of ``model_dir`` and write the files ``recipe.report`` asks for."""
    report = build_report(model_dir, options=report_options(recipe), log=log)
    files: dict[str, Path] = {}
    for fmt in recipe.report.formats:
        path = out / f"{REPORT_STEM}.{'md' if fmt == 'markdown' else fmt}"
        atomic_write_text(path, render(report, fmt) + "\n")
        files[fmt] = path
    if recipe.report.plot:
        files["plot"] = plot_report(report, out / f"{REPORT_STEM}.png")
    return report, files


__all__ = ["REPORT_STEM", "build_source", "check_model", "convert_stage", "finetune_stage", "report_options",
           "report_stage"]
