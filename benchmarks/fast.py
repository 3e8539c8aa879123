"""Fast forms (issue 23): FLOPs and latency of a torchvision model converted with schemes
that compute less (flip, quarter, eigen:16 on every eligible layer) against the source,
eager and onnxruntime, batch 1 and 8; and one isolated layer's speed-up.

Every latency figure is the median of the per-pair ratios of interleaved pairs
(``_median_pair``); FLOPs come from torch's flop counter on what actually runs."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

SCHEMES = ("flip", "quarter", "eigen:16")
#: ``--scheme auto --schemes AUTO_SCHEMES --target-flops AUTO_FLOPS`` (0.6, the issue's
#: figure, is beyond resnet50's reach: its fast forms save at most 37.9 % of the FLOPs)
AUTO_SCHEMES, AUTO_FLOPS = "flip,quarter,eigen:16", 0.7


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    from symconvert.report.measure import count_flops

    return count_flops(model, x)


def _eager(model: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            model(x)
    return run


def _ort_pair(source: nn.Module, converted: nn.Module, tmp: Path, scheme: str,
              batches: tuple[int, ...], size: int, repeats: int) -> dict:
    """onnxruntime: the source exported dense against the converted model exported
    ``--packed`` (which keeps the fast forms)."""
    from benchmarks.__main__ import _median_pair
    from benchmarks.deploy import ort_session
    from symconvert.io.export import export

    dense_path = tmp / "source.onnx"
    if not dense_path.is_file():  # the plain source, as `export --format onnx` writes it
        with torch.no_grad():
            torch.onnx.export(source, (torch.randn(1, 3, size, size),), str(dense_path),
                              input_names=["input"], output_names=["logits"], dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    packed = export(copy.deepcopy(converted), "onnx", tmp / f"{scheme}.onnx", packed=True)
    sessions = {"dense": ort_session(dense_path, threads=1), "fast": ort_session(packed, threads=1)}
    out = {}
    for batch in batches:
        feed = {"input": torch.randn(batch, 3, size, size).numpy()}
        for s in sessions.values():
            s.run(None, feed)
        d, f, ratio = _median_pair(lambda s=sessions["dense"], x=feed: s.run(None, x),
                                   lambda s=sessions["fast"], x=feed: s.run(None, x), repeats)
        out[f"b{batch}"] = {"source_s": d, "fast_s": f, "fast/source": ratio}
    return out


def bench_fast(name: str, batches: tuple[int, ...], size: int, repeats: int,
               schemes: tuple[str, ...] = (*SCHEMES, "auto"), onnx: bool = True) -> dict:
    import torchvision

    import symconvert
    from benchmarks.__main__ import _median_pair
    from symconvert.surgery.fast import fast_modules

    torch.manual_seed(0)
    source = torchvision.models.get_model(name).eval()
    x1 = torch.randn(1, 3, size, size)
    result: dict = {"model": name, "input_px": size, "source_flops": _flops(source, x1)}
    with tempfile.TemporaryDirectory(prefix="symconvert-fast-") as tmp:
        for scheme in schemes:
            converted = copy.deepcopy(source)
            if scheme == "auto":
                symconvert.convert(converted, "auto", schemes=AUTO_SCHEMES,
                                   target_flops=AUTO_FLOPS, flops_input=x1)
            else:
                symconvert.convert(converted, scheme)
            converted.eval()
            row: dict = {"fast_layers": len(fast_modules(converted)),
                         "flops/source": _flops(converted, x1) / result["source_flops"]}
            for batch in batches:
                x = torch.randn(batch, 3, size, size)
                _eager(source, x)(), _eager(converted, x)()  # warm-up
                s, f, ratio = _median_pair(_eager(source, x), _eager(converted, x), repeats)
                row[f"eager_b{batch}"] = {"source_s": s, "fast_s": f, "fast/source": ratio}
            if onnx:
                row["onnxruntime"] = _ort_pair(source, converted, Path(tmp), scheme, batches,
                                               size, repeats)
            result[scheme] = row
    return result


def bench_layer(channels: int = 256, px: int = 14, batch: int = 8, repeats: int = 20,
                scheme: str = "flip") -> dict:
    """One 3x3 conv (resnet50's layer3 size) converted with a 4x scheme: fast form
    against the same layer's dense forward (same weights), eager."""
    import symconvert
    from benchmarks.__main__ import _median_pair
    from symconvert.surgery.fast import dense_forward

    torch.manual_seed(0)
    layer = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
    symconvert.convert(layer, scheme, include_head=True)
    layer.eval()
    x = torch.randn(batch, channels, px, px)

    def dense():
        with torch.no_grad(), dense_forward():
            layer(x)

    fast = _eager(layer, x)
    dense(), fast()
    d, f, ratio = _median_pair(dense, fast, repeats)
    return {"scheme": scheme, "shape": [channels, channels, 3, 3], "input": list(x.shape),
            "dense_s": d, "fast_s": f, "fast/dense": ratio, "speed-up": 1 / ratio}
