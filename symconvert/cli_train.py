"""CLI commands of the training stage: ``finetune`` and ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from symconvert.cli import app, console, err_console
from symconvert.metadata import TRUST_CODE_HELP

DATA_HELP = (
    "digits | fashion-mnist[:ROOT] | mnist:ROOT | cifar10:ROOT | cifar100:ROOT | "
    "imagefolder:ROOT (ROOT/train/CLASS/*, ROOT/val/CLASS/*)."
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
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default 0.01 for sgd, 3e-4 for adamw)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Batch size per process (torchrun: × processes)."),
    opt: str = typer.Option("sgd", "--opt", help="sgd (Nesterov momentum 0.9, timm's default) or adamw."),
    sched: str = typer.Option("cosine", "--sched", help="cosine, step (× --decay-rate every third of the run), multistep (at --decay-milestones) or none."),
    decay_milestones: str | None = typer.Option(None, "--decay-milestones", help="For --sched multistep: epochs at which the lr is multiplied by --decay-rate, e.g. 60,120,160."),
    decay_rate: float = typer.Option(0.1, "--decay-rate", help="lr factor at each step/multistep decay."),
    weight_decay: float = typer.Option(5e-5, "--weight-decay", help="Weight decay (never on norms and biases)."),
    warmup_epochs: float = typer.Option(0.0, "--warmup-epochs", help="Linear warm-up, in epochs (fractions allowed)."),
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
    input_size: str | None = typer.Option(None, "--input-size", help=INPUT_SIZE_HELP),
    subsample: int | None = typer.Option(None, "--subsample", help=SUBSAMPLE_HELP),
    num_classes: int | None = typer.Option(None, "--num-classes", help="Replace the classifier head with N outputs (data with other classes)."),
    augment: bool | None = typer.Option(None, "--augment/--no-augment", help="Train-time crop/flip (default: per dataset; off for digits and (fashion-)MNIST)."),
    download: bool = typer.Option(False, "--download", help="Download mnist/cifar data into ROOT if missing."),
    fmt: str = typer.Option("table", "--format", help="table or json (the final metrics)."),
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
    """
    from symconvert.checks import check_finetune_args
    from symconvert.metadata import trusting_code

    # every number first: nothing is created or loaded for a bad flag
    check_finetune_args(epochs=epochs, lr=lr, batch_size=batch_size, decay_rate=decay_rate,
                        decay_milestones=decay_milestones, weight_decay=weight_decay,
                        warmup_epochs=warmup_epochs, clip_grad=clip_grad, workers=workers,
                        seed=seed, distill_alpha=distill_alpha,
                        distill_temperature=distill_temperature,
                        checkpoint_every=checkpoint_every, subsample=subsample,
                        num_classes=num_classes, input_size=input_size, fmt=fmt,
                        formats=("table", "json"))
    with trusting_code(trust_code):
        _finetune_command(model_dir, data, out, epochs, lr, batch_size, opt, sched,
                          decay_milestones, decay_rate, weight_decay, warmup_epochs, clip_grad,
                          amp, device, workers, seed, distill, distill_alpha,
                          distill_temperature, teacher, resume, overwrite, checkpoint_every,
                          input_size, subsample, num_classes, augment, download, fmt)


def _finetune_command(model_dir, data, out, epochs, lr, batch_size, opt, sched,
                      decay_milestones, decay_rate, weight_decay, warmup_epochs, clip_grad, amp,
                      device, workers, seed, distill, distill_alpha, distill_temperature,
                      teacher, resume, overwrite, checkpoint_every, input_size, subsample,
                      num_classes, augment, download, fmt) -> None:
    from symconvert.train import TrainingInterrupted, finetune

    if data.startswith("text:"):
        _finetune_text(model_dir, data, out, epochs=epochs, lr=lr, batch_size=batch_size,
                       clip_grad=clip_grad, device=device, seed=seed, overwrite=overwrite, fmt=fmt)
        return
    try:
        result = finetune(
            model_dir, data, out, teacher=teacher, num_classes=num_classes, resume=resume,
            overwrite=overwrite, epochs=epochs, lr=lr, batch_size=batch_size, opt=opt, sched=sched,
            decay_milestones=decay_milestones, decay_rate=decay_rate,
            weight_decay=weight_decay, warmup_epochs=warmup_epochs, clip_grad=5.0 if clip_grad is None else (clip_grad or None),
            amp=amp, device=device, workers=workers, seed=seed, distill=distill,
            distill_alpha=distill_alpha, distill_temperature=distill_temperature,
            checkpoint_every=checkpoint_every, input_size=input_size, subsample=subsample,
            augment=augment, download=download,
        )
    except TrainingInterrupted as exc:
        err_console.print(f"[yellow]interrupted:[/] {exc}", highlight=False)
        # SystemExit, not typer.Exit: cli.main returns SystemExit codes as the exit status.
        raise SystemExit(130) from None
    import os

    if os.environ.get("RANK", "0") != "0":
        return
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
    """Top-1/top-5 accuracy on the data's eval split (deterministic, no augmentation).

    JSON output is one line: {"top1": 0.973, "top5": 0.999, "n": 360, "split": "test"}
    (fractions in [0, 1]).

    Examples:

      symconvert evaluate r18-channel/finetuned --data digits

      symconvert evaluate r18-channel --data fashion-mnist --format json

      symconvert evaluate timm:resnet18 --data imagefolder:/data/imagenet --batch-size 128

      symconvert evaluate py:mymodels:net --weights net.safetensors --data cifar10:/data/cifar
    """
    from symconvert.evaluate import evaluate, load_model

    if fmt not in ("table", "json"):
        from symconvert.errors import SymconvertError

        raise SymconvertError(f"--format {fmt!r}: choose table or json")
    from symconvert.checks import check_number_args
    from symconvert.metadata import trusting_code

    check_number_args(batch_size=batch_size, subsample=subsample, workers=workers,
                      input_size=input_size)
    with trusting_code(trust_code):
        m = load_model(model, pretrained=pretrained, weights=weights)
    if data.startswith("text:"):
        # language models: perplexity on the corpus's eval split (test, else valid)
        from symconvert.lm import evaluate_lm, load_corpus

        recorded = (getattr(m, "symconvert_metadata", None) or {}).get("lm", {})
        corpus = load_corpus(data, max_vocab=recorded.get("max_vocab"))
        result = evaluate_lm(m, corpus, device=None if device == "auto" else device)
        if fmt == "json":
            print(json.dumps(result))
            return
        _eval_table(f"{model} on {data}", result)
        return
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


def _finetune_text(model_dir, data, out, *, epochs, lr, batch_size, clip_grad, device, seed,
                   overwrite, fmt) -> None:
    """`finetune --data text:ROOT`: BPTT fine-tuning of a language model (symconvert.lm),
    with the paper's lr 20 and clip 0.25 unless given."""
    from symconvert.files import output_dir
    from symconvert.lm import finetune_lm

    target = Path(out) if out is not None else Path(model_dir) / "finetuned"
    with output_dir(target, inputs=[model_dir]):  # locked; removed if nothing was written
        result = finetune_lm(
            model_dir, data, out, epochs=epochs, lr=lr if lr is not None else 20.0,
            overwrite=overwrite, batch_size=batch_size,
            clip=0.25 if clip_grad is None else clip_grad,
            device=None if device == "auto" else device, seed=seed,
        )
    summary = {"out": str(result["out"]), "perplexity_before": result["before"]["perplexity"],
               **result["after"], "epochs": len(result["metrics"])}
    if fmt == "json":
        print(json.dumps(summary))
        return
    _eval_table(f"fine-tuned → {result['out']}", summary)
