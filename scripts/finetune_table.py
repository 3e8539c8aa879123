"""The budget × start × settings table of a recovery fine-tune (issue 13, README
"Fine-tuning a converted model").

For one pretrained model and scheme, builds three starts once: the naive conversion, the
calibrated conversion (``--calibrate`` on 512 train images) and the dense control (the
unconverted source), then fine-tunes each start with ``symconvert.train.fit`` (the
trainer ``finetune`` runs) under each settings variant and budget, and scores every
result on the same test images. Prints one JSON line per run and a markdown table.

    python scripts/finetune_table.py --model fashion_resnet --scheme channel \
        --budgets 5000 --variants default,new
    python scripts/finetune_table.py --model fashion_vit --scheme block --budgets 5000,60000

A variant is a name from VARIANTS or ``key=value[,key=value]`` FinetuneConfig fields
joined by ``+`` (``lr=0.02+warmup_epochs=0.1``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import fields

import torch

import symconvert
from symconvert.tasks.data import create_loaders
from symconvert.train.config import FinetuneConfig, task_config
from symconvert.train.evaluate import evaluate_loaders
from symconvert.train.loop import fit

# Named settings. "default" is whatever FinetuneConfig defaults to at the time of the run.
VARIANTS: dict[str, dict] = {
    "default": {},
    "old": {"lr": 0.01, "warmup_epochs": 0.0, "distill_alpha": 0.7, "distill_temperature": 2.0,
            "weight_decay": 5e-5},
    "augment": {"augment": True},
}


def parse_variant(text: str) -> dict:
    if text in VARIANTS:
        return dict(VARIANTS[text])
    names = {f.name: f.type for f in fields(FinetuneConfig)}
    out: dict = {}
    for item in text.split("+"):
        key, _, value = item.partition("=")
        if key not in names:
            raise SystemExit(f"unknown variant or field {key!r}")
        out[key] = json.loads(value) if value not in ("", None) else None
    return out


def starts(model_name: str, scheme: str, samples: int) -> dict[str, torch.nn.Module]:
    source = symconvert.create_model(model_name, pretrained=True)
    source.eval()
    naive, _ = symconvert.convert(copy.deepcopy(source), scheme)
    t = time.time()
    calibrated, _ = symconvert.convert(copy.deepcopy(source), scheme, calibrate="fashion-mnist",
                                       calibration_samples=samples)
    print(f"# calibration {time.time() - t:.1f}s", file=sys.stderr, flush=True)
    return {"source": source, "naive": naive, "calibrated": calibrated, "dense": source}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fashion_resnet")
    ap.add_argument("--scheme", default="channel")
    ap.add_argument("--budgets", default="5000", help="train images per epoch, comma-separated "
                    "(60000 = the whole train split)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--starts", default="naive,calibrated,dense")
    ap.add_argument("--variants", default="default")
    ap.add_argument("--eval", type=int, default=10000, help="test images scored")
    ap.add_argument("--calibration-samples", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = starts(f"timm:{args.model}", args.scheme, args.calibration_samples)
    teacher = models["source"]
    test = create_loaders("fashion-mnist", teacher, train=False, eval_batch_size=500,
                          subsample=None if args.eval >= 10000 else args.eval)
    before = {k: evaluate_loaders(m, test)["top1"] for k, m in models.items() if k != "source"}
    rows = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        for variant in args.variants.split(","):
            overrides = parse_variant(variant)
            for start in args.starts.split(","):
                model = copy.deepcopy(models[start])
                model.requires_grad_(True)  # "dense" is the teacher, which fit() freezes
                cfg = FinetuneConfig(**task_config("fashion-mnist", {
                    "epochs": args.epochs, "seed": args.seed, "device": "cpu",
                    "subsample": None if budget >= 60000 else budget, **overrides}))
                loaders = create_loaders("fashion-mnist", model, batch_size=cfg.batch_size,
                                         augment=cfg.augment, subsample=cfg.subsample,
                                         seed=cfg.seed, eval_batch_size=500)
                t = time.time()
                with tempfile.TemporaryDirectory() as tmp:
                    fit(model, loaders, tmp, cfg, teacher=teacher if cfg.distill else None,
                        progress=False)
                after = evaluate_loaders(model, test)["top1"]
                row = {"model": args.model, "scheme": args.scheme, "budget": budget,
                       "epochs": args.epochs, "variant": variant, "start": start,
                       "before": round(100 * before[start], 2), "after": round(100 * after, 2),
                       "seconds": round(time.time() - t, 1), "n_eval": test.n_eval}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| budget | variant | start | before | after |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']}×{r['epochs']} | {r['variant']} | {r['start']} | "
              f"{r['before']:.2f} % | {r['after']:.2f} % |")


if __name__ == "__main__":
    main()
