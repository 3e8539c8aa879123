"""CLI commands of the training stage: ``finetune`` (its options are ``FinetuneConfig``'s)
and ``evaluate``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from symconvert.checks import check_format, check_number_args
from symconvert.cli.app import app, console
from symconvert.cli.options import with_options
from symconvert.io.metadata import TRUST_CODE_HELP, trusting_code
from symconvert.tasks import task_for_scores
from symconvert.train.config import FinetuneConfig, data_task, finetune_config
from symconvert.train.evaluate import evaluate, load_model
from symconvert.train.run import FinetuneResult, finetune

DATA_HELP = (
    "digits | fashion-mnist[:ROOT] | mnist:ROOT | cifar10:ROOT | cifar100:ROOT | "
    "imagefolder:ROOT (ROOT/train/CLASS/*, ROOT/val/CLASS/*) | text:ROOT (language models: "
    "ROOT/train.txt, valid.txt, test.txt; perplexity)."
)
INPUT_SIZE_HELP = "Input size H or H,W (default: the model's pretrained config)."
SUBSAMPLE_HELP = "At most N items per split (stratified, deterministic); for quick checks."
DEVICE_HELP = "auto (CUDA when available), cpu, cuda, cuda:N."


@app.command("finetune")
@with_options(FinetuneConfig, unset=True)
def finetune_command(
    model_dir: Path = typer.Argument(..., help="A converted-model directory (symconvert convert)."),
    data: str = typer.Option(..., "--data", "-d", help=DATA_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (default DIR/finetuned)."),
    config: dict = None,  # --epochs … --dtype (FinetuneConfig)
    teacher: str | None = typer.Option(None, "--teacher", help="Teacher MODEL or model directory (default: the recorded source model)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint (same flags)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an --out that already holds a run."),
    num_classes: int | None = typer.Option(None, "--num-classes", help="Replace the classifier head with N outputs (data with other classes)."),
    fmt: str = typer.Option("table", "--format", help="table or json (the final metrics)."),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP),
) -> None:
    """Recover accuracy of a converted model: distillation from the source, AMP, DDP, resume.

    Writes --out as a model directory again (loadable with symconvert.load, usable by
    evaluate/report/export) plus metrics.jsonl and checkpoint.pt. Ctrl-C / SIGTERM writes a
    checkpoint; rerun the same command with --resume to continue. An option left out takes
    the task's default: the model's task where it reads the data (an hf: model on text:
    AdamW lr 1e-4, clip 1, batch 16), else the data's (text: lr 20, clip 0.25, batch 20,
    plain SGD).

    Examples:

      symconvert finetune r18-channel --data digits --epochs 3

      symconvert finetune r18-channel --data fashion-mnist --input-size 64 --subsample 5000

      symconvert finetune r50-ch --data imagefolder:/data/imagenet --opt adamw --lr 1e-4 --amp

      symconvert finetune r50-ch --data imagefolder:/data/imagenet --momentum 0.95 --min-lr 1e-5 --amp --amp-dtype float16

      torchrun --standalone --nproc-per-node 4 -m symconvert finetune r50-ch --data imagefolder:/data/imagenet

      symconvert finetune r18-channel --data digits --resume     # after an interruption

      symconvert finetune r18-channel --data digits --dtype bfloat16   # half-size --out

      symconvert finetune lm-channel --data text:data/ptb --epochs 6   # lr 20, clip 0.25, plain SGD
    """
    # every option first: nothing is created or loaded for a bad flag
    # the model's task where it reads the data (an hf: causal LM on text:), else the data's
    cfg = finetune_config(data_task(data, model_dir), **config)
    check_number_args(num_classes=num_classes)
    check_format(fmt, ("table", "json"))
    # a signal stops at a step boundary with a checkpoint (TrainingInterrupted: cli.app
    # prints where it is and exits 130/143)
    with trusting_code(trust_code):
        result = finetune(model_dir, data, out, cfg, teacher=teacher,
                          num_classes=num_classes, resume=resume, overwrite=overwrite)
    if os.environ.get("RANK", "0") == "0":
        _print_finetuned(result, fmt)


def _print_finetuned(result: FinetuneResult, fmt: str) -> None:
    """Rank 0: the final metrics."""
    summary = {"out": str(result.out), **result.eval, "params": result.params,
               "epochs": len(result.metrics)}
    if fmt == "json":
        print(json.dumps(summary))
        return
    _eval_table(f"fine-tuned → {result.out}", summary)


@app.command("evaluate")
def evaluate_command(
    model: str = typer.Argument(..., help="A model directory, or a MODEL string (timm:NAME, torchvision:NAME, py:mod:fn)."),
    data: str = typer.Option(..., "--data", "-d", help=DATA_HELP),
    fmt: str = typer.Option("table", "--format", help="table or json."),
    input_size: str | None = typer.Option(None, "--input-size", help=INPUT_SIZE_HELP),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Evaluation batch size."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    subsample: int | None = typer.Option(None, "--subsample", help=SUBSAMPLE_HELP),
    workers: int = typer.Option(0, "--workers", help="Data-loading worker processes."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="For a MODEL string: load pretrained weights."),
    weights: Path | None = typer.Option(None, "--weights", help="For a MODEL string: local .safetensors/.pth weights."),
    download: bool = typer.Option(False, "--download", help="Download mnist/cifar data into ROOT if missing."),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP),
) -> None:
    """Top-1/top-5 accuracy (text: perplexity) on the data's eval split (deterministic, no augmentation).

    JSON output is one line: {"top1": 0.973, "top5": 0.999, "n": 360, "split": "test"}
    (fractions in [0, 1]).

    Examples:

      symconvert evaluate r18-channel/finetuned --data digits

      symconvert evaluate r18-channel --data fashion-mnist --format json

      symconvert evaluate timm:resnet18 --data imagefolder:/data/imagenet --batch-size 128

      symconvert evaluate py:mymodels:net --weights net.safetensors --data cifar10:/data/cifar
    """
    check_format(fmt, ("table", "json"))
    check_number_args(batch_size=batch_size, subsample=subsample, workers=workers,
                      input_size=input_size)
    with trusting_code(trust_code):
        m = load_model(model, pretrained=pretrained, weights=weights)
    result = evaluate(m, data, batch_size=batch_size, device=device, input_size=input_size,
                      subsample=subsample, workers=workers, download=download)
    if fmt == "json":
        print(json.dumps(result))
        return
    _eval_table(f"{model} on {data}", result)


def _eval_table(title: str, result: dict[str, Any]) -> None:
    metrics = {m.key: m for m in task_for_scores(result).score_metrics}
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, metrics[key].format(value) if key in metrics else str(value))
    console.print(table)


__all__ = ["DATA_HELP", "finetune_command"]
