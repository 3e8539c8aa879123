"""Where layer-wise calibration spends its time: the bench's resnet50 (`channel`, random
weights, batch 32, 224 px) under cProfile, after one timed eval forward of the same inputs.

    python scripts/profile_calibration.py [SAMPLES]   # default 512; run it alone
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.__main__ import _calibration_setup  # noqa: E402
from symconvert.surgery.calibrate import calibrate  # noqa: E402


def main() -> None:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    model, source, x = _calibration_setup("resnet50", samples, 224, 32)

    def forward() -> None:
        with torch.no_grad():
            for chunk in x.split(32):
                source(chunk)

    forward()  # warm-up
    start = time.perf_counter()
    forward()
    fwd = time.perf_counter() - start
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    result = calibrate(model, source, x, samples=samples, batch_size=32, steps=0, progress=False)
    profile.disable()
    cal = time.perf_counter() - start
    errors = list(result.layers.values())
    print(f"forward {fwd:.1f} s, calibration {cal:.1f} s ({cal / fwd:.2f}x); mean layer error "
          f"{statistics.mean(e['output_error'] for e in errors):.4f}; CG steps "
          f"{[e.get('iterations') for e in errors]}")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(45)


if __name__ == "__main__":
    main()
