"""Measure what a converted model ships as: file bytes of every format and onnxruntime
latency packed / dense. Prints the README's deployment table row(s).

    python scripts/deploy_table.py timm:resnet101 channel
    python scripts/deploy_table.py timm:vit_base_patch16_224 block

Runs the same steps as the CLI (``convert --no-pretrained``, ``export --format onnx|
torchscript [--packed] [--dtype]``); sizes do not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def measure(model_name: str, scheme: str, repeats: int, batches=(1, 8)) -> dict:
    from safetensors.torch import save_file

    import symconvert
    from benchmarks.__main__ import _median_pair
    from benchmarks.deploy import ort_session
    from symconvert.io.export import export

    torch.manual_seed(0)
    sizes: dict = {}
    with tempfile.TemporaryDirectory(prefix="symconvert-deploy-") as tmp:
        tmp = Path(tmp)
        model = symconvert.create_model(model_name, pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "src.safetensors"))
        sizes["source (safetensors)"] = (tmp / "src.safetensors").stat().st_size
        symconvert.convert(model, scheme)
        symconvert.save(model, tmp / "dir")
        sizes["symconvert dir"] = (tmp / "dir" / "model.safetensors").stat().st_size
        symconvert.save(symconvert.load(tmp / "dir"), tmp / "dir16", dtype="bfloat16")
        sizes["symconvert dir, --dtype bfloat16"] = (tmp / "dir16" / "model.safetensors").stat().st_size
        paths = {}
        for label, fmt, packed, dtype in (
            ("dense ONNX", "onnx", False, None), ("packed ONNX", "onnx", True, None),
            ("packed TorchScript", "torchscript", True, None),
            ("packed ONNX, --dtype float16", "onnx", True, "float16"),
        ):
            path = export(symconvert.load(tmp / "dir"), fmt, tmp / label.replace(" ", "_"),
                          packed=packed, dtype=dtype)
            sizes[label] = path.stat().st_size
            paths[label] = path
        latency = {}
        from symconvert.tasks import task_of

        task = task_of(model)
        (example,) = task.example_inputs(model)
        if example.is_floating_point():  # images: a latency ratio per batch size
            sessions = {k: ort_session(paths[k]) for k in ("dense ONNX", "packed ONNX")}
            for batch in batches:
                x = {"input": torch.randn(task.example_inputs(model, batch)[0].shape).numpy()}
                for s in sessions.values():
                    s.run(None, x)
                _, _, ratio = _median_pair(
                    lambda x=x: sessions["dense ONNX"].run(None, x),
                    lambda x=x: sessions["packed ONNX"].run(None, x), repeats)
                latency[f"b{batch}"] = ratio
    return {"model": model_name, "scheme": scheme, "bytes": sizes, "ort_packed/dense": latency}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("scheme")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.model, args.scheme, args.repeats)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    src = result["bytes"]["source (safetensors)"]
    print(f"| {args.model} `{args.scheme}` | bytes | vs source |")
    print("|---|---:|---:|")
    for label, n in result["bytes"].items():
        print(f"| {label} | {n:,} | {n / src:.3f} |")
    for batch, ratio in result["ort_packed/dense"].items():
        print(f"| onnxruntime latency packed / dense, batch {batch[1:]} | {ratio:.3f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
