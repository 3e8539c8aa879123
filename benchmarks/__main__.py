"""Run the benchmarks of SPEC section 9 and write benchmarks/results.json.

Each figure is a ratio of two measurements taken in the same run, interleaved (A, B,
A, B, ...) and reduced by the median, so that machine load shifts both sides alike.
Peak memory is measured in a fresh subprocess per variant: the kernel's high-water mark
of resident memory (VmHWM, reset through /proc/self/clear_refs just before the step)
minus the resident memory of the process before the model was built.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results.json"


def _median_pair(fa, fb, repeats: int, alternate: bool = True) -> tuple[float, float, float]:
    """Median times of A and B, and the median of the per-pair ratios B/A. Pairs are
    interleaved and alternate which side runs first (A B, B A, ...): a slow spell of the
    machine hits both sides of a pair alike, and the second call of a pair, measured ~2.5 %
    slower here, is not always the same side."""
    a, b = [], []
    for i in range(repeats):
        for side in ((fb, b), (fa, a)) if alternate and i % 2 else ((fa, a), (fb, b)):
            t = time.perf_counter()
            side[0]()
            side[1].append(time.perf_counter() - t)
    ratio = statistics.median(y / x for x, y in zip(a, b, strict=True))
    return statistics.median(a), statistics.median(b), ratio


def bench_surgery(name: str, repeats: int) -> dict:
    import torchvision

    import symconvert

    def build():
        return torchvision.models.get_model(name)

    models = []

    def b():
        models.append(build())

    def c():
        symconvert.convert(models.pop(), "channel")

    build_t, surgery_t, ratio = _median_pair(b, c, repeats, alternate=False)  # c needs b's model
    return {"model": name, "build_s": build_t, "surgery_s": surgery_t, "surgery/build": ratio}


def bench_eval(name: str, batch: int, size: int, repeats: int) -> dict:
    import torchvision

    import symconvert

    torch.manual_seed(0)
    source = torchvision.models.get_model(name).eval()
    converted = torchvision.models.get_model(name).eval()
    converted.load_state_dict(source.state_dict())
    symconvert.convert(converted, "channel")
    folded = torchvision.models.get_model(name).eval()
    tmp = torchvision.models.get_model(name)
    tmp.load_state_dict(source.state_dict())
    symconvert.convert(tmp, "channel")
    folded.load_state_dict(symconvert.fold(tmp).state_dict())
    x = torch.randn(batch, 3, size, size)

    def run(m):
        def f():
            with torch.no_grad():
                m(x)
        return f

    for m in (source, converted, folded):  # warm-up (and fill the dense-weight cache)
        run(m)()
    src_t, _, conv_ratio = _median_pair(run(source), run(converted), repeats)
    _, _, fold_ratio = _median_pair(run(source), run(folded), repeats)
    return {"model": name, "batch": batch, "size": size,
            "converted/original": conv_ratio, "folded/original": fold_ratio,
            "original_s": src_t}


def bench_checkpoint(name: str) -> dict:
    import torchvision

    import symconvert

    model = symconvert.create_model(f"torchvision:{name}", pretrained=False)
    symconvert.convert(model, "channel")
    free = symconvert.count_parameters(model)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    with tempfile.TemporaryDirectory() as tmp:
        symconvert.save(model, tmp)
        size = (Path(tmp) / "model.safetensors").stat().st_size
    del torchvision
    return {"model": name, "bytes": size, "free_params": free, "buffer_bytes": buffers,
            "bytes/(free params x 4)": size / (free * 4),
            "bytes/(free params x 4 + buffers)": size / (free * 4 + buffers)}


def _train_setup(name: str, variant: str, batch: int, size: int):
    import torchvision

    import symconvert

    torch.manual_seed(0)
    model = torchvision.models.get_model(name)
    if variant == "converted":
        symconvert.convert(model, "channel")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def bench_train_step(name: str, batch: int, size: int, repeats: int) -> dict:
    original = _train_setup(name, "original", batch, size)
    converted = _train_setup(name, "converted", batch, size)
    original(), converted()  # warm-up: optimiser state, allocator
    o, c, ratio = _median_pair(original, converted, repeats)
    return {"model": name, "batch": batch, "size": size, "original_s": o, "converted_s": c,
            "converted/original": ratio}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _peak_memory_child(name: str, variant: str, batch: int, size: int) -> None:
    import torchvision  # noqa: F401

    import symconvert  # noqa: F401  (imports counted in the baseline)

    base = _rss_kib("VmRSS")
    step = _train_setup(name, variant, batch, size)
    step()  # first step allocates optimiser state: part of fine-tuning memory
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident size
    step()
    step()
    print(json.dumps({"peak_kib": _rss_kib("VmHWM") - base}))


def bench_peak_memory(name: str, batch: int, size: int) -> dict:
    out = {}
    for variant in ("original", "converted"):
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks", "--child-memory", name, variant, str(batch), str(size)],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
        )
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_kib"]
    return {"model": name, "batch": batch, "size": size, "original_mib": out["original"] / 1024,
            "converted_mib": out["converted"] / 1024,
            "converted/original": out["converted"] / out["original"]}


def _calibration_setup(name: str, samples: int, size: int, batch: int):
    import copy

    import torchvision

    import symconvert

    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(samples, 3, size, size)
    source = copy.deepcopy(model)
    symconvert.convert(model, "channel")
    return model, source, x


def _calibration_child(name: str, samples: int, size: int, batch: int) -> None:
    """In a fresh process: one eval forward of the inputs, then calibration (channel, all
    defaults) timed and its peak resident memory (VmHWM reset just before), then the forward
    again (recorded, not divided by)."""
    import symconvert  # noqa: F401
    from symconvert.surgery.calibrate import calibrate

    base = _rss_kib("VmRSS")
    model, source, x = _calibration_setup(name, samples, size, batch)

    def forward():
        with torch.no_grad():
            for chunk in x.split(batch):
                source(chunk)

    forward()  # warm-up
    t0 = time.perf_counter()
    forward()
    fwd = time.perf_counter() - t0
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    t0 = time.perf_counter()
    # the layer-wise solver (steps=0): block-wise refinement adds Adam steps per block on top
    result = calibrate(model, source, x, samples=samples, batch_size=batch, steps=0, progress=False)
    cal = time.perf_counter() - t0
    peak = _rss_kib("VmHWM") - base
    # the forward timed again after, for the record only: in a fresh process much of a
    # forward's time is the kernel's (page faults: 2.08 M minor faults for 64 inputs), and
    # after a calibration the same forward faults far less (75 k) and runs ~2x faster; the
    # ratio divides by the first, the forward a user's own run of the inputs gets
    t0 = time.perf_counter()
    forward()
    after = time.perf_counter() - t0
    errors = list(result.layers.values())
    print(json.dumps({
        "forward_s": fwd, "forward_after_s": after, "calibration_s": cal, "calibration/forward": cal / fwd,
        "peak_kib": peak, "layers": len(errors),
        "cg_iterations": [e.get("iterations") for e in errors],
        "mean_output_error_naive": statistics.mean(e["output_error_naive"] for e in errors),
        "mean_output_error": statistics.mean(e["output_error"] for e in errors)}))


def bench_calibration(name: str, samples: int, size: int, batch: int) -> dict:
    """Calibration of ``samples`` inputs (resnet50, channel): time as a ratio to one eval
    forward pass of the same inputs, peak memory as a ratio to a fine-tuning step of the
    converted model at the same batch size (fresh subprocesses)."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--child-calibration", name,
                           str(samples), str(size), str(batch)],
                          capture_output=True, text=True, check=True, cwd=root)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--child-memory", name, "converted",
                           str(batch), str(size)], capture_output=True, text=True, check=True, cwd=root)
    step = json.loads(proc.stdout.strip().splitlines()[-1])["peak_kib"]
    out.update({"model": name, "samples": samples, "size": size, "batch": batch,
                "calibration_mib": out["peak_kib"] / 1024, "train_step_mib": step / 1024,
                "calibration/train step": out["peak_kib"] / step})
    return out


TARGETS = {
    "surgery/build": 1.0,
    "eval converted/original": 1.05,
    "eval folded/original": 1.02,
    "bytes/(free params x 4)": 1.001,
    "train step converted/original": 1.05,
    "peak memory converted/original": 1.0,
    "onnxruntime packed/dense latency": 1.05,
    "calibration time/forward": 30.0,
    "calibration peak memory/train step": 1.5,
    "fast layer flip fast/dense latency": round(1 / 3.6, 3),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller inputs")
    parser.add_argument("--child-memory", nargs=4, metavar=("MODEL", "VARIANT", "BATCH", "SIZE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["calibration", "fast"],
                        help="run one group of benchmarks")
    parser.add_argument("--calibration", nargs=3, type=int, metavar=("SAMPLES", "SIZE", "BATCH"),
                        default=None, help="calibration setting (default 64 128 32; the issue's "
                        "512 224 is too slow for a shared CPU)")
    parser.add_argument("--child-calibration", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_calibration:
        name, samples, size, batch = args.child_calibration
        _calibration_child(name, int(samples), int(size), int(batch))
        return 0
    if args.child_memory:
        name, variant, batch, size = args.child_memory
        _peak_memory_child(name, variant, int(batch), int(size))
        return 0

    from rich.console import Console
    from rich.table import Table

    reps = 4 if args.quick else 16
    console = Console()
    results: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                     "cpu_count": os.cpu_count(), "quick": args.quick}
    samples, size, batch = args.calibration or ((32, 96, 32) if args.quick else (64, 128, 32))
    if args.only == "fast":
        results.update(json.loads(RESULTS.read_text()) if RESULTS.is_file() else {})
        results.update({"torch": torch.__version__, "threads": torch.get_num_threads()})
        _fast_benches(console, results, args.quick)
        for row in results["table"]:
            if row["ratio"].startswith("fast"):
                console.print(f"{row['ratio']} ({row['setting']}): {row['value']:.3f}")
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    if args.only == "calibration":
        results.update(json.loads(RESULTS.read_text()) if RESULTS.is_file() else {})
        results.update({"torch": torch.__version__, "threads": torch.get_num_threads()})
        _calibration_benches(console, results, samples, size, batch)
        for row in results["table"]:
            if row["ratio"].startswith("calibration"):
                console.print(f"{row['ratio']} ({row['setting']}): {row['value']:.3f}")
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    with console.status("surgery vs build (resnet101)"):
        results["surgery"] = bench_surgery("resnet101", reps)
    with console.status("eval forward (resnet101)"):
        results["eval"] = bench_eval("resnet101", 8, 128 if args.quick else 160, reps)
    with console.status("checkpoint bytes (resnet101)"):
        results["checkpoint"] = bench_checkpoint("resnet101")
    with console.status("train step (resnet50, batch 8, 128 px)"):
        results["train_step"] = bench_train_step("resnet50", 8, 128, reps)
    with console.status("peak memory of a fine-tuning step (resnet50, batch 8, 128 px)"):
        results["peak_memory"] = bench_peak_memory("resnet50", 8, 128)
    with console.status("deployment: packed/dense ONNX under onnxruntime (resnet50 channel)"):
        from benchmarks.deploy import bench_deploy

        results["deploy"] = bench_deploy("resnet50", (1, 8), 224, max(reps // 2, 3))

    rows = [
        ("surgery/build", "resnet101", results["surgery"]["surgery/build"]),
        ("eval converted/original", "resnet101 b8", results["eval"]["converted/original"]),
        ("eval folded/original", "resnet101 b8", results["eval"]["folded/original"]),
        ("bytes/(free params x 4)", "resnet101", results["checkpoint"]["bytes/(free params x 4)"]),
        ("bytes/(free params x 4 + buffers)", "resnet101",
         results["checkpoint"]["bytes/(free params x 4 + buffers)"]),
        ("train step converted/original", "resnet50 b8 128px", results["train_step"]["converted/original"]),
        ("peak memory converted/original", "resnet50 b8 128px", results["peak_memory"]["converted/original"]),
        ("packed-ONNX bytes/symconvert bytes", "resnet50 channel", results["deploy"]["packed_onnx/symconvert"]),
        ("dense-ONNX bytes/source bytes", "resnet50", results["deploy"]["dense_onnx/source"]),
        ("onnxruntime packed/dense latency", "resnet50 b1 224px", results["deploy"]["b1"]["packed/dense"]),
        ("onnxruntime packed/dense latency", "resnet50 b8 224px", results["deploy"]["b8"]["packed/dense"]),
    ]
    results["table"] = [{"ratio": r, "setting": st, "value": v, "target": TARGETS.get(r)} for r, st, v in rows]
    _calibration_benches(console, results, samples, size, batch)
    _fast_benches(console, results, args.quick)
    rows = [(r["ratio"], r["setting"], r["value"]) for r in results["table"]]
    table = Table(title=f"symconvert benchmarks (CPU, {results['threads']} threads, torch {torch.__version__})")
    for col in ("ratio", "setting", "value", "target"):
        table.add_column(col, justify="right" if col in ("value", "target") else "left")
    for label, setting, value in rows:
        target = TARGETS.get(label)
        mark = "" if target is None else (" ✓" if value <= target else " ✗")
        table.add_row(label, setting, f"{value:.4f}{mark}", "—" if target is None else f"≤ {target}")
    console.print(table)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")
    return 0


def _calibration_benches(console, results: dict, samples: int, size: int, batch: int) -> None:
    setting = f"resnet50 {samples} inputs {size}px b{batch}"
    with console.status(f"calibration time and peak memory ({setting})"):
        results["calibration"] = bench_calibration("resnet50", samples, size, batch)
    table = [r for r in results.get("table", []) if not r["ratio"].startswith("calibration")]
    for label, value in (("calibration time/forward", results["calibration"]["calibration/forward"]),
                         ("calibration peak memory/train step",
                          results["calibration"]["calibration/train step"])):
        table.append({"ratio": label, "setting": setting, "value": value, "target": TARGETS[label]})
    results["table"] = table


def _fast_benches(console, results: dict, quick: bool) -> None:
    """Issue 23: resnet50 224 px converted with flip, quarter, eigen:16 (every eligible
    layer): FLOPs and latency vs the source, eager and onnxruntime, batch 1 and 8; one
    isolated 4x layer. Rows ``fast ...`` replace any earlier ones in the table."""
    from benchmarks.fast import AUTO_FLOPS, SCHEMES, bench_fast, bench_layer

    reps = 3 if quick else 7
    with console.status("fast forms: one 3x3 256-channel layer, flip (4x fewer multiply-adds)"):
        results["fast_layer"] = bench_layer(repeats=4 * reps)
    with console.status("fast forms: resnet50 224 px, flip / quarter / eigen:16"):
        results["fast"] = bench_fast("resnet50", (1, 8), 224, reps)
    table = [r for r in results.get("table", []) if not r["ratio"].startswith("fast")]
    layer = results["fast_layer"]
    table.append({"ratio": "fast layer flip fast/dense latency",
                  "target": TARGETS["fast layer flip fast/dense latency"],
                  "setting": "256x256x3x3, b8 14px", "value": layer["fast/dense"]})
    for scheme in (*SCHEMES, "auto"):
        row = results["fast"][scheme]
        if scheme == "auto":
            scheme = f"auto --target-flops {AUTO_FLOPS}"
        table.append({"ratio": "fast FLOPs/source", "setting": f"resnet50 {scheme}",
                      "value": row["flops/source"], "target": None})
        for batch in (1, 8):
            for engine, part in (("eager", row[f"eager_b{batch}"]),
                                 ("onnxruntime", row["onnxruntime"][f"b{batch}"])):
                table.append({"ratio": f"fast {engine} latency/source", "target": None,
                              "setting": f"resnet50 {scheme} b{batch}",
                              "value": part["fast/source"]})
    results["table"] = table


if __name__ == "__main__":
    sys.exit(main())
