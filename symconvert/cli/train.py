"""CLI commands of the training stage: ``finetune`` and ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from symconvert.cli.app import app, console, err_console
from symconvert.io.metadata import TRUST_CODE_HELP

DATA_HELP = (
    "digits | fashion-mnist[:ROOT] | mnist:ROOT | cifar10:ROOT | cifar100:ROOT | "
    "imagefolder:ROOT (ROOT/train/CLASS/*, ROOT/val/CLASS/*) | text:ROOT (language models: "
    "ROOT/train.txt, valid.txt, test.txt; perplexity)."
)
INPUT_SIZE_HELP = "Input size H or H,W (default: the model's pretrained config)."
SUBSAMPLE_HELP = "At most N items per split (stratified, deterministic); for quick checks."
DEVICE_HELP = "auto (CUDA when available), cpu, cuda, cuda:N."


@app.command("finetune")
def finetune_command(
    model_dir: Path = typer.Argument(..., help="A converted-model directory (symconvert convert)."),
    data: str = typer.Option(..., "--data", "-d", help=DATA_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (default DIR/finetuned)."),
    epochs: int = typer.Option(2, "--epochs", help="Epochs of fine-tuning."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default 0.02 for sgd, 3e-4 for adamw; text: 20, plain SGD)."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Batch size per process (torchrun: × processes); default 64, text: 20 streams."),
    opt: str = typer.Option("sgd", "--opt", help="sgd (Nesterov momentum 0.9, timm's default) or adamw."),
    sched: str = typer.Option("cosine", "--sched", help="cosine, step (× --decay-rate every third of the run), multistep (at --decay-milestones) or none."),
    decay_milestones: str | None = typer.Option(None, "--decay-milestones", help="For --sched multistep: epochs at which the lr is multiplied by --decay-rate, e.g. 60,120,160."),
    decay_rate: float = typer.Option(0.1, "--decay-rate", help="lr factor at each step/multistep decay."),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="Weight decay (never on norms and biases); default 5e-5, text: 0."),
    warmup_epochs: float | None = typer.Option(None, "--warmup-epochs", help="Linear warm-up, in epochs (fractions allowed; default a tenth of an epoch but at least 20 steps for images, 0 for text)."),
    clip_grad: float | None = typer.Option(None, "--clip-grad", help="Clip the global gradient norm (0 disables; default 5.0, or the paper's 0.25 for text:)."),
    amp: bool | None = typer.Option(None, "--amp/--no-amp", help="Mixed precision (default: on for CUDA, off for CPU; bf16 on CPU)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    workers: int = typer.Option(0, "--workers", help="Data-loading worker processes."),
    seed: int = typer.Option(0, "--seed", help="Seed for shuffling, augmentation and new heads."),
    distill: bool = typer.Option(True, "--distill/--no-distill", help="Distil from the unconverted source model."),
    distill_alpha: float = typer.Option(0.7, "--distill-alpha", help="Weight of the distillation (KL) term; 1-alpha on cross-entropy."),
    distill_temperature: float = typer.Option(2.0, "--distill-temperature", help="Softmax temperature of the distillation term."),
    teacher: str | None = typer.Option(None, "--teacher", help="Teacher MODEL or model directory (default: the recorded source model)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint (same flags)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an --out that already holds a run."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Also checkpoint every N steps (0: every epoch only)."),
    log_interval: int = typer.Option(0, "--log-interval", help="When stderr is not a terminal (nohup, SLURM, CI): a plain progress line every N steps (0: every ~30 s)."),
    bptt: int = typer.Option(35, "--bptt", help="text: tokens per truncated-BPTT segment."),
    input_size: str | None = typer.Option(None, "--input-size", help=INPUT_SIZE_HELP),
    subsample: int | None = typer.Option(None, "--subsample", help=SUBSAMPLE_HELP + " text: N tokens per split."),
    num_classes: int | None = typer.Option(None, "--num-classes", help="Replace the classifier head with N outputs (data with other classes)."),
    augment: bool | None = typer.Option(None, "--augment/--no-augment", help="Train-time crop/flip (default off: it costs accuracy in a short distilled recovery)."),
    download: bool = typer.Option(False, "--download", help="Download mnist/cifar data into ROOT if missing."),
    fmt: str = typer.Option("table", "--format", help="table or json (the final metrics)."),
    dtype: str = typer.Option("float32", "--dtype", help="Storage precision of the written model directory: float32, bfloat16 or float16 (training stays float32)."),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP),
) -> None:
    """Recover accuracy of a converted model: distillation from the source, AMP, DDP, resume.

    Writes --out as a model directory again (loadable with symconvert.load, usable by
    evaluate/report/export) plus metrics.jsonl and checkpoint.pt. Ctrl-C / SIGTERM writes a
    checkpoint; rerun the same command with --resume to continue.

    Examples:

      symconvert finetune r18-channel --data digits --epochs 3

      symconvert finetune r18-channel --data fashion-mnist --input-size 64 --subsample 5000

      symconvert finetune r50-ch --data imagefolder:/data/imagenet --opt adamw --lr 1e-4 --amp

      torchrun --standalone --nproc-per-node 4 -m symconvert finetune r50-ch --data imagefolder:/data/imagenet

      symconvert finetune r18-channel --data digits --resume     # after an interruption

      symconvert finetune r18-channel --data digits --dtype bfloat16   # half-size --out

      symconvert finetune lm-channel --data text:data/ptb --epochs 6   # lr 20, clip 0.25, plain SGD
    """
    from symconvert.checks import check_finetune_args
    from symconvert.io.export_packed import parse_dtype

    # what `symconvert.train.run.finetune` takes besides the directories, in the order the
    # numbers are checked
    settings = dict(epochs=epochs, lr=lr, batch_size=batch_size, decay_rate=decay_rate,
                    decay_milestones=decay_milestones, weight_decay=weight_decay,
                    warmup_epochs=warmup_epochs, clip_grad=clip_grad, workers=workers,
                    seed=seed, distill_alpha=distill_alpha,
                    distill_temperature=distill_temperature,
                    checkpoint_every=checkpoint_every, subsample=subsample,
                    num_classes=num_classes, input_size=input_size, log_interval=log_interval,
                    bptt=bptt, opt=opt, sched=sched, amp=amp, device=device, distill=distill,
                    augment=augment, download=download)
    # every number first: nothing is created or loaded for a bad flag
    check_finetune_args(**settings, fmt=fmt, formats=("table", "json"))
    parse_dtype(dtype)  # a bad --dtype fails before training
    result = _run_finetune(model_dir, data, out, teacher, resume, overwrite, trust_code,
                           settings)
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    _finish_finetune(result, dtype, fmt)


def _run_finetune(model_dir: Path, data: str, out: Path | None, teacher: str | None,
                  resume: bool, overwrite: bool, trust_code: bool, settings: dict):
    """``symconvert.train.run.finetune``; an interruption (Ctrl-C, SIGTERM) exits 130."""
    from symconvert.io.metadata import trusting_code
    from symconvert.train.loop import TrainingInterrupted
    from symconvert.train.run import finetune

    try:
        with trusting_code(trust_code):
            return finetune(model_dir, data, out, teacher=teacher, resume=resume,
                            overwrite=overwrite, **settings)
    except TrainingInterrupted as exc:
        err_console.print(f"[yellow]interrupted:[/] {exc}", highlight=False)
        # SystemExit, not typer.Exit: cli.main returns SystemExit codes as the exit status.
        raise SystemExit(130) from None


def _finish_finetune(result, dtype: str, fmt: str) -> None:
    """Rank 0: store --out at --dtype and print the final metrics."""
    from symconvert.io.export_packed import store_directory_as

    store_directory_as(result.out, dtype)
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
    from symconvert.train.evaluate import evaluate, load_model

    if fmt not in ("table", "json"):
        from symconvert.errors import SymconvertError

        raise SymconvertError(f"--format {fmt!r}: choose table or json")
    from symconvert.checks import check_number_args
    from symconvert.io.metadata import trusting_code

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


def _eval_table(title: str, result: dict) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        shown = f"{value:.2%}" if key in ("top1", "top5") else str(value)
        table.add_row(key, shown)
    console.print(table)
