"""Deployment benchmark (SPEC §9): file bytes of the packed and dense ONNX exports and
onnxruntime latency packed / dense, for a torchvision model converted with ``channel``."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch


def ort_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session at the default optimisation level (ORT_ENABLE_ALL),
    which folds the packed model's constant gather sub-graphs into dense weights once,
    when the session is created."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench_deploy(name: str, batches: tuple[int, ...], size: int, repeats: int) -> dict:
    from safetensors.torch import save_file

    import symconvert
    from benchmarks.__main__ import _median_pair
    from symconvert.io.export import export

    torch.manual_seed(0)
    result: dict = {"model": name, "scheme": "channel", "input_px": size}
    with tempfile.TemporaryDirectory(prefix="symconvert-bench-") as tmp:
        tmp = Path(tmp)
        model = symconvert.create_model(f"torchvision:{name}", pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "source.safetensors"))
        symconvert.convert(model, "channel")
        symconvert.save(model, tmp / "dir")
        paths, created = {}, {}
        for kind in ("dense", "packed"):
            paths[kind] = export(symconvert.load(tmp / "dir"), "onnx", tmp / f"{kind}.onnx",
                                 packed=kind == "packed")
        sessions = {}
        for kind, path in paths.items():
            t = time.perf_counter()
            sessions[kind] = ort_session(path)
            created[kind] = time.perf_counter() - t
        ckpt = (tmp / "dir" / "model.safetensors").stat().st_size
        source = (tmp / "source.safetensors").stat().st_size
        sizes = {k: p.stat().st_size for k, p in paths.items()}
        result.update({
            "source_bytes": source, "symconvert_bytes": ckpt,
            "dense_onnx_bytes": sizes["dense"], "packed_onnx_bytes": sizes["packed"],
            "packed_onnx/symconvert": sizes["packed"] / ckpt,
            "dense_onnx/source": sizes["dense"] / source,
            "session_s": created,
        })
        for batch in batches:
            x = {"input": torch.randn(batch, 3, size, size).numpy()}
            for s in sessions.values():  # warm-up
                s.run(None, x)
            dense_t, packed_t, ratio = _median_pair(lambda s=sessions["dense"], x=x: s.run(None, x),
                                                    lambda s=sessions["packed"], x=x: s.run(None, x),
                                                    repeats)
            result[f"b{batch}"] = {"dense_s": dense_t, "packed_s": packed_t,
                                   "packed/dense": ratio}
    return result
