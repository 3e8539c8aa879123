"""The README table of issue 21: symmetry against what users pick instead, at the same budget.

Through the CLI, on one pretrained model and its data: converts the model twice (naive and
``--calibrate``), fine-tunes each with the same budget, then reports the calibrated one with
``--compare structured,lowrank,dense`` (the baselines fine-tuned with the budget recorded in
that directory, low-rank whitened by the same calibration inputs) and the naive one with
``--compare lowrank`` (plain SVD: it was not calibrated). Prints a markdown table of
accuracy before and after fine-tuning, parameters, bytes, FLOPs and latency.

    python scripts/compare_table.py --out /tmp/cmp44 \\
        --model timm:cifar_resnet44 \\
        --weights ../shared/data/pretrained/cifar10-resnet44.safetensors \\
        --data imagefolder:../shared/data/cifar10-jpeg --train-subsample 2000 --eval-subsample 1000

Every step is skipped when its output exists (rerun to finish an interrupted table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _run(*args: str) -> None:
    cmd = [sys.executable, "-m", "symconvert", *args]
    print("$ symconvert " + " ".join(args), file=sys.stderr, flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)


def build(a: argparse.Namespace) -> dict[str, Path]:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = ["--weights", a.weights] if a.weights else []
    dirs = {"naive": out / "naive", "calibrated": out / "calibrated"}
    for name, path in dirs.items():
        calib = (["--calibrate", a.calibrate or a.data, "--calibration-samples",
                  str(a.calibration_samples)] if name == "calibrated" else [])
        if not (path / "model.safetensors").is_file():
            _run("convert", a.model, *weights, "--scheme", a.scheme, *calib, "--out", str(path))
        ft = path / "finetuned"
        if not (ft / "model.safetensors").is_file():
            _run("finetune", str(path), "--data", a.data, "--epochs", str(a.epochs),
                 "--subsample", str(a.train_subsample), "--device", "cpu", "--out", str(ft))
    reports = {}
    for name, kinds in (("calibrated", "structured,lowrank,dense"), ("naive", "lowrank")):
        target = out / f"report-{name}.json"
        if not target.is_file():
            _run("report", str(dirs[name] / "finetuned"), "--data", a.data, "--subsample",
                 str(a.eval_subsample), "--compare", kinds, "--device", "cpu",
                 "--latency-runs", str(a.latency_runs), "--format", "json", "--out", str(target))
        reports[name] = target
    return reports


def _pct(entry: dict | None) -> str:
    value = (entry or {}).get("top1")
    return "—" if value is None else f"{value * 100:.2f} %"


def _row(label: str, e: dict, before: dict | None) -> str:
    flops = e.get("flops")
    lat = e.get("latency_vs_source")
    return (f"| {label} | {_pct(before)} | {_pct(e)} | {e['params_stored']:,} | "
            f"{e['bytes']:,} | {flops / 1e6:.1f} M | {lat:.2f}× |" if flops and lat else
            f"| {label} | {_pct(before)} | {_pct(e)} | {e['params_stored']:,} | "
            f"{e['bytes']:,} | — | — |")


def table(reports: dict[str, Path]) -> str:
    cal = json.loads(reports["calibrated"].read_text())
    naive = json.loads(reports["naive"].read_text())
    c, n = cal["compare"], naive["compare"]
    lines = [f"{cal['model']}, {c['removed']:,} of {cal['params']['before']:,} parameters "
             f"removed by each; top-1 on {cal['accuracy']['n']:,} stratified "
             f"{cal['accuracy']['split']} images; budget: {c['budget'].get('epochs')} "
             f"epoch(s), distillation {'on' if c['budget'].get('distill') else 'off'}",
             "", "| model | top-1 before FT | top-1 after FT | params | file bytes | FLOPs "
             "| latency vs source |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines.append(_row(f"symmetric {cal['scheme']}, naive", n["symmetric"],
                      naive["accuracy"].get("converted")))
    lines.append(_row(f"symmetric {cal['scheme']}, calibrated", c["symmetric"],
                      cal["accuracy"].get("calibrated")))
    for label, entry in (("structured (Torch-Pruning)", c.get("structured")),
                         ("low-rank SVD, plain", n.get("lowrank")),
                         ("low-rank SVD, whitened", c.get("lowrank")),
                         ("dense (source)", c.get("dense"))):
        if not entry:
            continue
        if "reason" in entry:
            lines.append(f"| {label} | cannot reach the budget: {entry['reason']} |||||")
            continue
        lines.append(_row(label, entry, entry.get("before_finetune")))
    lines += ["", c["summary"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="timm:cifar_resnet44")
    p.add_argument("--weights", default=None)
    p.add_argument("--scheme", default="channel")
    p.add_argument("--data", required=True)
    p.add_argument("--calibrate", default=None, help="calibration data (default: --data)")
    p.add_argument("--calibration-samples", type=int, default=512)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-subsample", type=int, default=2000)
    p.add_argument("--eval-subsample", type=int, default=1000)
    p.add_argument("--latency-runs", type=int, default=10)
    a = p.parse_args()
    print(table(build(a)))


if __name__ == "__main__":
    main()
