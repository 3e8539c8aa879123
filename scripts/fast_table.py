"""Accuracy against FLOPs and latency of the fast forms (issue 23, README "Faster than
dense"): a real pretrained CIFAR-10 ResNet converted with schemes that compute less,
calibrated, then fine-tuned one epoch, beside the dense control (the source fine-tuned
the same way).

    python scripts/fast_table.py --schemes flip,quarter,eigen:8 --budget 2000 --eval 2000

FLOPs: torch's flop counter on what runs (one 32x32 image). Latency: eager, batch 8,
interleaved pairs against the source, alternating which side runs first, median of the
per-pair ratios. Prints one JSON line per plan and a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch

import symconvert
from symconvert.report.measure import count_flops
from symconvert.surgery.fast import fast_modules
from symconvert.tasks.data import create_loaders
from symconvert.train.config import FinetuneConfig, task_config
from symconvert.train.evaluate import evaluate_loaders
from symconvert.train.loop import fit

ROOT = "/work/shared/data"
DATA = f"imagefolder:{ROOT}/cifar10-jpeg"
WEIGHTS = f"{ROOT}/pretrained/cifar10-resnet44.safetensors"


def latency_ratio(source, model, batch: int, pairs: int) -> float:
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ratios = []
    with torch.no_grad():
        source(x), model(x)
        for i in range(pairs):
            times = {}
            for name, m in ((("model", model), ("source", source)) if i % 2 else
                            (("source", source), ("model", model))):
                t = time.perf_counter()
                m(x)
                times[name] = time.perf_counter() - t
            ratios.append(times["model"] / times["source"])
    return statistics.median(ratios)


def finetune(model, teacher, budget: int, seed: int):
    model.requires_grad_(True)
    cfg = FinetuneConfig(**task_config(DATA, {"epochs": 1, "seed": seed, "device": "cpu",
                                              "subsample": budget}))
    loaders = create_loaders(DATA, model, batch_size=cfg.batch_size, augment=cfg.augment,
                             subsample=cfg.subsample, seed=cfg.seed, eval_batch_size=500)
    with tempfile.TemporaryDirectory() as tmp:
        fit(model, loaders, tmp, cfg, teacher=teacher if cfg.distill else None, progress=False)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="timm:cifar_resnet44")
    ap.add_argument("--weights", default=WEIGHTS)
    ap.add_argument("--schemes", default="flip,quarter,eigen:8")
    ap.add_argument("--budget", type=int, default=2000, help="train images of the one epoch")
    ap.add_argument("--eval", type=int, default=2000, help="val images scored")
    ap.add_argument("--calibration-samples", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-dense", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source = symconvert.create_model(args.model, weights=args.weights).eval()
    test = create_loaders(DATA, source, train=False, eval_batch_size=500, subsample=args.eval)
    flops0 = count_flops(source, torch.randn(1, 3, 32, 32))
    plans = ([] if args.skip_dense else ["dense"]) + args.schemes.split(",")
    rows = []
    for plan in plans:
        t = time.time()
        if plan == "dense":
            model, start = copy.deepcopy(source), None
        else:
            model, _ = symconvert.convert(copy.deepcopy(source), plan, calibrate=DATA,
                                          calibration_samples=args.calibration_samples)
            model.eval()
            start = evaluate_loaders(model, test)["top1"]
        row = {"plan": plan, "fast_layers": len(fast_modules(model)),
               "params": symconvert.count_parameters(model),
               "flops/source": count_flops(model, torch.randn(1, 3, 32, 32)) / flops0,
               "latency/source b8": latency_ratio(source, model, 8, args.pairs),
               "calibrated": None if start is None else round(100 * start, 2)}
        model = finetune(model, source, args.budget, args.seed)
        row["one_epoch"] = round(100 * evaluate_loaders(model, test)["top1"], 2)
        row.update({"n_eval": test.n_eval, "budget": args.budget, "seconds": round(time.time() - t)})
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| plan | fast layers | FLOPs / source | latency / source (b8, eager) | calibrated "
          "| after one epoch |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cal = "—" if r["calibrated"] is None else f"{r['calibrated']:.2f} %"
        print(f"| {r['plan']} | {r['fast_layers']} | {r['flops/source']:.3f} | "
              f"{r['latency/source b8']:.3f} | {cal} | {r['one_epoch']:.2f} % |")


if __name__ == "__main__":
    main()
