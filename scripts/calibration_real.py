"""Layer-wise calibration of a real pretrained CIFAR-10 ResNet: time, mean per-layer output
error (naive and fitted), CG steps per layer and top-1 on the JPEG val images.

    python scripts/calibration_real.py --depth 44 --data ../shared/data [--steps 0] [--val 10000]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import symconvert
from symconvert.train.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", default="44")
    parser.add_argument("--data", default="../shared/data", help="the shared data folder")
    parser.add_argument("--scheme", default="channel")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--steps", type=int, default=0, help="block steps (0: layer-wise)")
    parser.add_argument("--val", type=int, default=10000)
    args = parser.parse_args()
    root = Path(args.data)
    data = f"imagefolder:{root / 'cifar10-jpeg'}"
    torch.manual_seed(0)
    source = symconvert.create_model(
        f"timm:cifar_resnet{args.depth}",
        weights=root / "pretrained" / f"cifar10-resnet{args.depth}.safetensors")
    model, plan = symconvert.convert(copy.deepcopy(source), args.scheme)
    start = time.perf_counter()
    result = symconvert.calibrate(model, source, data, args.samples, plan=plan, steps=args.steps,
                                  progress=False)
    seconds = time.perf_counter() - start
    fitted = [r for r in result.layers.values() if r.get("output_error") is not None]
    print(f"calibration {seconds:.1f} s, {len(fitted)} layers; mean output error naive "
          f"{statistics.mean(r['output_error_naive'] for r in fitted):.4f}, fitted "
          f"{statistics.mean(r['output_error'] for r in fitted):.4f}; CG steps "
          f"{[r.get('iterations') for r in fitted]}")
    metrics = evaluate(model, data, subsample=args.val, device="cpu")
    print(f"top-1 {100 * metrics['top1']:.2f} % on {metrics['n']} val images")


if __name__ == "__main__":
    main()
