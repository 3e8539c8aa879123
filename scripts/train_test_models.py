"""Train the pretrained Fashion-MNIST test models shipped with symconvert
(``timm:fashion_resnet``, ``timm:fashion_vit``; see symconvert/models/fashion.py).

Data: symconvert's own ``--data fashion-mnist`` loaders (the model's preprocessing, no
augmentation), a seeded stratified subset of the train split; top-1 on the full 10,000-image
test split. CPU, seeded; a few minutes per model on one thread.

Writes ``symconvert/assets/<model>.safetensors`` (fp32 state_dict) and ``<model>.json``
(architecture, training settings, test top-1, command, versions).

    python scripts/train_test_models.py --model fashion_resnet
    python scripts/train_test_models.py --model fashion_vit
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import symconvert  # noqa: F401  (registers the models)
from symconvert.models.fashion import ASSETS_DIR
from symconvert.tasks.data import create_loaders
from symconvert.train.evaluate import evaluate_loaders

SETTINGS = {
    "fashion_resnet": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "epochs": 2,
                       "subsample": 20000, "batch_size": 128},
    "fashion_vit": {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05, "epochs": 6,
                    "subsample": 20000, "batch_size": 128},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(SETTINGS), required=True)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--subsample", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = dict(SETTINGS[args.model])
    cfg.update({k: v for k, v in (("epochs", args.epochs), ("subsample", args.subsample)) if v})
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False)
    loaders = create_loaders("fashion-mnist", model, batch_size=cfg["batch_size"], augment=False,
                             subsample=cfg["subsample"], seed=args.seed, eval_batch_size=500)
    full_eval = create_loaders("fashion-mnist", model, train=False, eval_batch_size=500)
    params = [p for p in model.parameters()]
    if cfg["optimizer"] == "sgd":
        opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, nesterov=True,
                              weight_decay=cfg["weight_decay"])
    else:
        opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps = cfg["epochs"] * len(loaders.train)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))
    start = time.time()
    for epoch in range(cfg["epochs"]):
        loaders.set_epoch(epoch)
        model.train()
        total, n = 0.0, 0
        for x, y in loaders.train:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            total += float(loss) * len(y)
            n += len(y)
        print(f"epoch {epoch + 1}/{cfg['epochs']} loss {total / n:.4f} ({time.time() - start:.0f}s)",
              flush=True)
    seconds = time.time() - start
    model.eval()
    result = evaluate_loaders(model, full_eval)
    print(f"{args.model}: test top-1 {result['top1']:.4f} on {result['n']} images", flush=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = ASSETS_DIR / f"{args.model}.safetensors"
    save_file(state, str(path))
    meta = {"model": args.model, "data": "fashion-mnist", "n_train": loaders.n_train,
            "n_test": result["n"], "test_top1": result["top1"], "test_top5": result.get("top5"),
            "params": sum(p.numel() for p in model.parameters()),
            "training": {**cfg, "schedule": "5% linear warm-up, cosine to 0",
                         "label_smoothing": 0.1, "clip_grad": 5.0, "augment": False,
                         "train_seconds": round(seconds, 1), "threads": args.threads},
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "seed": args.seed,
            "versions": {"torch": torch.__version__, "timm": timm.__version__},
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (ASSETS_DIR / f"{args.model}.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
