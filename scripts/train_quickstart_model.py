"""Train the quickstart classifier shipped with symconvert (``timm:quickstart_digits``).

Model: ``resnet_cifar_tiny`` (symconvert/models/cifar_resnet.py) with 1 input channel and
10 classes, on scikit-learn's bundled 8x8 digits: fixed stratified split with seed 0
(1437 train / 360 test), pixel values 0..16 scaled to [0, 1] and normalised with the
model's pretrained_cfg mean/std. CPU, one thread, seeded and deterministic; about a minute.

Writes ``symconvert/assets/quickstart_digits.safetensors`` (fp32 state_dict) and
``symconvert/assets/quickstart_digits.json`` (architecture, kwargs, data config, the test
top-1 reached, the exact command, seed and versions).

    python scripts/train_quickstart_model.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from symconvert.models.cifar_resnet import (
    QUICKSTART_INPUT_SIZE,
    QUICKSTART_METADATA,
    QUICKSTART_MODEL_ARGS,
    QUICKSTART_WEIGHTS,
    CifarResNet,
)

TEST_SIZE = 360
SPLIT_SEED = 0


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as float images in [0, 1], shape (N, 1, 8, 8): the fixed 1437/360 split."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=SPLIT_SEED
    )

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)

    return images(x_tr), torch.from_numpy(y_tr), images(x_te), torch.from_numpy(y_te)


def random_shift(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``pad`` pixels (zero padding), independently per sample."""
    if pad == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, :, None]
    cols = (dx + torch.arange(w))[:, None, :]
    return padded[torch.arange(b)[:, None, None], rows, cols].permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Top-1 accuracy and the number correct, in eval mode."""
    model.eval()
    correct = int((model(x).argmax(1) == y).sum())
    return correct / len(y), correct


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(args.seed)

    x_tr, y_tr, x_te, y_te = load_digits_split()
    model = timm.create_model("quickstart_digits", pretrained=False)
    assert isinstance(model, CifarResNet)
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    # Padding with the normalised value of a black pixel keeps shifted borders "black".
    black = float(-mean.flatten()[0] / std.flatten()[0])

    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
    )
    steps_per_epoch = math.ceil(len(y_tr) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = steps_per_epoch  # one epoch of linear warm-up, then cosine to zero
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        ),
    )

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=generator)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            xb = random_shift(x_tr[idx] - black, args.shift, generator) + black
            loss = F.cross_entropy(model(xb), y_tr[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            acc, _ = accuracy(model, x_te, y_te)
            print(
                f"epoch {epoch + 1:3d}  loss {loss_sum / len(y_tr):.4f}  test top-1 {acc:.4f}",
                flush=True,
            )
    seconds = time.perf_counter() - start

    train_top1, _ = accuracy(model, x_tr, y_tr)
    test_top1, test_correct = accuracy(model, x_te, y_te)
    return {
        "model": model,
        "train_seconds": round(seconds, 1),
        "train_top1": train_top1,
        "test_top1": test_top1,
        "test_correct": test_correct,
        "n_test": len(y_te),
        "n_train": len(y_tr),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--shift", type=int, default=1, help="random translation, pixels")
    parser.add_argument("--seed", type=int, default=0)
    # One thread: this tiny model gains nothing from more, and on a busy 2-core machine a
    # second OpenMP thread makes training 5-10x slower. Fixed, because results depend on it.
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (fixed for determinism)"
    )
    parser.add_argument("--weights", type=Path, default=QUICKSTART_WEIGHTS)
    parser.add_argument("--metadata", type=Path, default=QUICKSTART_METADATA)
    parser.add_argument("--dry-run", action="store_true", help="train and report, write nothing")
    args = parser.parse_args(argv)

    result = train(args)
    model = result.pop("model")
    print(
        f"test top-1 {result['test_top1']:.4f} ({result['test_correct']}/{result['n_test']}), "
        f"train top-1 {result['train_top1']:.4f}, {result['train_seconds']} s"
    )
    if args.dry_run:
        return

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    args.weights.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key: safetensors writes its metadata map in arbitrary order, and the file's
    # sha256 (recorded below) should only change when the weights do.
    save_file(state, str(args.weights), metadata={"format": "pt"})
    sha256 = hashlib.sha256(args.weights.read_bytes()).hexdigest()
    cfg = model.pretrained_cfg
    command = "python scripts/train_quickstart_model.py" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv)
    )
    metadata = {
        "model": "resnet_cifar_tiny",
        "timm_name": "quickstart_digits",
        "model_kwargs": {
            k: list(v) if isinstance(v, tuple) else v for k, v in QUICKSTART_MODEL_ARGS.items()
        },
        "in_chans": QUICKSTART_MODEL_ARGS["in_chans"],
        "num_classes": QUICKSTART_MODEL_ARGS["num_classes"],
        "input_size": list(QUICKSTART_INPUT_SIZE),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "preprocessing": "pixels / 16 -> [0, 1], then (x - mean) / std; no resize",
        "data": {
            "name": "digits",
            "source": "sklearn.datasets.load_digits",
            "split": f"train_test_split(test_size={TEST_SIZE}, stratify=y, random_state={SPLIT_SEED})",
            "n_train": result["n_train"],
            "n_test": result["n_test"],
        },
        "test_top1": result["test_top1"],
        "test_correct": result["test_correct"],
        "train_top1": result["train_top1"],
        "params": sum(p.numel() for p in model.parameters()),
        "training": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": "sgd nesterov momentum 0.9",
            "lr": args.lr,
            "schedule": "1 epoch linear warm-up, cosine to 0",
            "weight_decay": args.weight_decay,
            "label_smoothing": args.label_smoothing,
            "random_shift_pixels": args.shift,
            "train_seconds": result["train_seconds"],
            "threads": args.threads,
        },
        "command": command,
        "seed": args.seed,
        "versions": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "scikit-learn": sklearn.__version__,
            "python": platform.python_version(),
        },
        "sha256": sha256,
    }
    args.metadata.write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"wrote {args.weights} ({args.weights.stat().st_size} bytes) and {args.metadata}")


if __name__ == "__main__":
    main()
