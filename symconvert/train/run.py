"""``finetune``: the command. Loads a converted model directory, builds the distillation
teacher, trains with ``symconvert.train.loop.fit`` and writes ``DIR/finetuned`` (a model
directory again, plus ``metrics.jsonl`` and the resumable ``checkpoint.pt``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from symconvert.checks import check_number_args
from symconvert.errors import DataError, SymconvertError
from symconvert.io.checkpoint import check_writable, save
from symconvert.io.files import WEIGHTS_NAME, check_path_given, output_dir
from symconvert.io.loading import load
from symconvert.models.sources import create_model, create_model_from_source, reset_head
from symconvert.surgery.plan import count_parameters
from symconvert.tasks import check_data
from symconvert.tasks.data import DataSpec, model_num_outputs
from symconvert.train.config import FinetuneConfig, data_task, finetune_config, plain
from symconvert.train.distributed import Dist, distributed
from symconvert.train.loop import build_loaders, err_console, fit
from symconvert.train.state import CHECKPOINT_NAME

# -------------------------------------------------------------------- the command


@dataclass
class FinetuneResult:
    out: Path
    metrics: list[dict[str, Any]]
    eval: dict[str, Any]
    params: int


def finetune(model_dir: str | os.PathLike, data: str | DataSpec,
             out: str | os.PathLike | None = None, config: FinetuneConfig | None = None, *,
             teacher: str | nn.Module | None = None, num_classes: int | None = None,
             resume: bool = False, overwrite: bool = False, progress: bool = True,
             **settings: Any) -> FinetuneResult:
    """Fine-tune the converted model in ``model_dir`` on ``data``; write ``out``
    (default ``model_dir/finetuned``) as a model directory (stored at ``config.dtype``)
    plus metrics and checkpoint.

    ``config`` is a ``FinetuneConfig``, taken as it is; without it, ``settings`` (its fields
    by name: epochs, lr, batch_size, opt, sched, ...) with the task's defaults for what they
    leave out (``finetune_config`` of ``data_task``: the directory's task where it reads the
    data, else the data's). With both, ``settings`` override ``config``.
    The teacher is the unconverted source model recorded in ``model_dir`` unless ``teacher``
    names another MODEL or model directory (or is a module).
    """
    check_number_args(num_classes=num_classes)
    if config is None:
        cfg = finetune_config(data_task(data, model_dir), **settings)
    else:
        cfg = dataclasses.replace(config, **settings) if settings else config
    model_dir = Path(model_dir)
    if out is not None:
        check_path_given(out)
    out = Path(out) if out is not None else model_dir / "finetuned"
    _check_output(out, resume, overwrite)
    student = load(model_dir)
    check_data(student, data)  # the data's task takes this model: before anything is created
    with distributed(cfg.device) as (dist, device):
        # created (and locked) only now; removed again if the run fails before it has a
        # checkpoint to resume from (a full disk, a signal, bad data)
        with output_dir(out, inputs=[model_dir], enabled=dist.main,
                        keep_partial=lambda: (out / CHECKPOINT_NAME).exists()):
            return _finetune(student, model_dir, data, out, cfg, teacher, num_classes,
                             resume, progress, dist, device)



def _finetune(student: nn.Module, model_dir: Path, data: str | DataSpec, out: Path,
              cfg: FinetuneConfig, teacher: str | nn.Module | None, num_classes: int | None,
              resume: bool, progress: bool, dist: Dist, device: torch.device) -> FinetuneResult:
    if dist.main:
        check_writable(out, overwrite=True)
        _ensure_writable(out)
    source = dict(student.symconvert_source)
    loaders = build_loaders(data, student, cfg, dist, device)
    if num_classes is not None and num_classes != loaders.num_classes:
        raise DataError(f"--num-classes {num_classes} but --data {loaders.spec.text} has "
                        f"{loaders.num_classes} classes; use --num-classes "
                        f"{loaders.num_classes}.")
    head_reset = False
    if num_classes is not None and loaders.task != "classification":
        raise DataError(f"--num-classes is for classifiers; --data {loaders.spec.text} is a "
                        f"{loaders.task} task.")
    if num_classes is not None and model_num_outputs(student, loaders.image_config) != num_classes:
        torch.manual_seed(cfg.seed)  # the new head is initialised identically on every rank
        reset_head(student, num_classes)
        student.symconvert_source = {**source, "num_classes": num_classes}
        head_reset = True

    teacher_model: nn.Module | None = None
    if cfg.distill:
        teacher_model = _build_teacher(teacher, source)
        t_out = (model_num_outputs(teacher_model, loaders.image_config)
                 if loaders.task == "classification" else loaders.num_classes)
        if t_out != loaders.num_classes:
            if dist.main:
                err_console.print(
                    f"[yellow]warning:[/] the teacher has {t_out} outputs but the data has "
                    f"{loaders.num_classes} classes"
                    f"{' (the head was reset)' if head_reset else ''}; distillation is off "
                    "for this run. Pass --teacher with a model trained on these classes to "
                    "distil.", highlight=False)
            teacher_model = None
            cfg = dataclasses.replace(cfg, distill=False)

    result = fit(student, loaders, out, cfg, teacher=teacher_model, resume=resume,
                 progress=progress)
    if dist.main:
        args = dict(plain(cfg))
        args.update({"data": str(data), "num_classes": num_classes,
                     "teacher": teacher if isinstance(teacher, str) else
                     ("source" if teacher_model is not None else None)})
        student.to("cpu", memory_format=torch.contiguous_format)
        save(student, out, extra_metadata={
            "finetune": {"args": args, "eval": result.eval,
                         "epochs_run": len(result.metrics)},
            "parent": str(model_dir.resolve()),
            **loaders.meta.get("record", {}),  # e.g. the vocabulary a language model reads
        }, dtype=cfg.dtype)
    return FinetuneResult(out=out, metrics=result.metrics, eval=result.eval,
                          params=count_parameters(student))


def _check_output(out: Path, resume: bool, overwrite: bool) -> None:
    """A finished or half-finished run in ``out`` is never silently overwritten."""
    if out.exists() and not out.is_dir():
        raise SymconvertError(f"--out {out} exists and is not a directory; choose another --out.")
    if resume or overwrite:
        return
    for name in (CHECKPOINT_NAME, WEIGHTS_NAME):
        if (out / name).exists():
            raise SymconvertError(
                f"{out} already holds a fine-tuning run ({name}). Pass --resume to continue it, "
                "--overwrite to start over in place, or choose another --out.")


def _ensure_writable(out: Path) -> None:
    # os.access() says yes to root everywhere; only a real write proves the directory usable.
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".symconvert-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SymconvertError(
            f"cannot write the fine-tuned model to {out}: {exc.strerror or exc}. Choose a "
            "writable directory with --out.") from None


def _build_teacher(teacher: str | nn.Module | None, source: dict[str, Any]) -> nn.Module:
    if isinstance(teacher, nn.Module):
        return teacher
    if teacher is None:
        if not source.get("pretrained") and not source.get("weights"):
            raise SymconvertError(
                "distillation needs the unconverted source model as teacher, but the converted "
                f"model's source ({source.get('library')}:{source.get('name')}) has neither "
                "pretrained weights nor a weights file. Pass --teacher MODEL_OR_DIR, or "
                "--no-distill.")
        return create_model_from_source(source)
    if Path(teacher).is_dir():
        return load(teacher)
    return create_model(teacher)


__all__ = ["FinetuneResult", "finetune"]
