"""Deployable exports, run for real: every ONNX export (dense and packed) under
onnxruntime against PyTorch, packed TorchScript through torch.jit.load, half-precision
model directories, and the packed file's size bound."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort  # a dev dependency: missing must fail, not skip
import pytest
import torch

import symconvert
from symconvert.io.export_packed import deployment_bytes, gather_tables

LM = "py:symconvert.models.lstm_lm:lstm_lm"
LM_KWARGS = ["--model-kwarg", "vocab_size=50", "--model-kwarg", "emb=16",
             "--model-kwarg", "hidden=16", "--model-kwarg", "dropout=0.0"]

pytestmark = pytest.mark.xdist_group("export_packed")


@pytest.fixture(autouse=True)
def _trust_test_models():
    """Some directories here record `py:toy_models:...` sources (this suite's own models):
    the tests opt in as `--trust-code` would."""
    from symconvert.io.metadata import trusting_code

    with trusting_code():
        yield


def _session(path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _reference(directory, x):
    model = symconvert.load(directory).eval()
    with torch.no_grad():
        out = model(x)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))
            for t in (t if isinstance(t, tuple) else (t,))]


def _check_onnx(cli, directory, tmp_path, inputs, packed: bool):
    name = "packed" if packed else "dense"
    out = tmp_path / f"{name}.onnx"
    args = ["export", directory, "--format", "onnx", "--out", out] + (["--packed"] if packed else [])
    result = cli(*args)
    assert result.code == 0, result
    session = _session(out)
    for x in inputs:  # the export's batch (1) and another
        ref = _reference(directory, x)
        got = session.run(None, {"input": x.numpy()})
        assert len(got) == len(ref)
        for g, r in zip(got, ref, strict=True):
            assert g.shape == r.shape
            assert _rel(g, r) <= 1e-4, (name, x.shape, _rel(g, r))
    return out


@pytest.fixture(scope="module")
def r18_dir(tmp_path_factory):
    from conftest import run_cli

    out = tmp_path_factory.mktemp("r18") / "r18"
    result = run_cli("convert", "timm:resnet18", "--scheme", "channel", "--no-pretrained",
                     "--out", out)
    assert result.code == 0, result
    return out


def test_resnet18_channel_onnx_dense_and_packed(cli, r18_dir, tmp_path):
    torch.manual_seed(0)
    inputs = [torch.randn(1, 3, 224, 224), torch.randn(3, 3, 224, 224)]
    dense = _check_onnx(cli, r18_dir, tmp_path, inputs, packed=False)
    packed = _check_onnx(cli, r18_dir, tmp_path, inputs, packed=True)
    ckpt = (r18_dir / "model.safetensors").stat().st_size
    info = deployment_bytes(symconvert.load(r18_dir))
    # the bound of the issue: the checkpoint + 1 % + the index tables
    assert packed.stat().st_size <= 1.01 * ckpt + info["index_bytes"]
    assert packed.stat().st_size < 0.9 * dense.stat().st_size
    # channel's row table is computed in-graph: nothing stored but the free parameters
    assert info["index_bytes"] == 0
    assert packed.stat().st_size <= 1.01 * ckpt
    # the estimate the report shows is what the file holds, to within its graph
    assert abs(packed.stat().st_size - info["packed_onnx"]) <= 0.01 * packed.stat().st_size


def test_resnet18_channel_torchscript_packed(cli, r18_dir, tmp_path):
    out = tmp_path / "r18.pt"
    result = cli("export", r18_dir, "--format", "torchscript", "--packed", "--out", out)
    assert result.code == 0, result
    loaded = torch.jit.load(str(out))
    dense = tmp_path / "r18-dense.pt"
    assert cli("export", r18_dir, "--format", "torchscript", "--out", dense).code == 0
    assert out.stat().st_size < 0.75 * dense.stat().st_size
    ckpt = (r18_dir / "model.safetensors").stat().st_size
    index = deployment_bytes(symconvert.load(r18_dir))["index_bytes"]
    assert out.stat().st_size <= 1.01 * ckpt + index
    for batch in (1, 2):
        x = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            got = loaded(x).numpy()
        assert _rel(got, _reference(r18_dir, x)[0]) <= 1e-4


def test_vit_block_onnx_dense_and_packed(cli, tmp_path):
    directory = tmp_path / "vit"
    result = cli("convert", "timm:vit_tiny_patch16_224", "--scheme", "block", "--no-pretrained",
                 "--model-kwarg", "depth=2", "--out", directory)
    assert result.code == 0, result
    torch.manual_seed(1)
    inputs = [torch.randn(1, 3, 224, 224), torch.randn(2, 3, 224, 224)]
    _check_onnx(cli, directory, tmp_path, inputs, packed=False)
    packed = _check_onnx(cli, directory, tmp_path, inputs, packed=True)
    import onnx

    index = deployment_bytes(symconvert.load(directory))["index_bytes"]
    ckpt = (directory / "model.safetensors").stat().st_size
    tensors = sum(len(i.raw_data) for i in onnx.load(str(packed)).graph.initializer)
    assert tensors <= 1.01 * ckpt + index
    # + the graph: ~150 bytes a node, 4 % of this 2-block toy ViT (< 1 % at full size)
    assert packed.stat().st_size <= 1.06 * ckpt + index


def test_lstm_lm_rnn_onnx_dense_and_packed(cli, tmp_path):
    directory = tmp_path / "lm"
    result = cli("convert", LM, "--scheme", "channel", "--no-pretrained", "--layers", "rnn",
                 *LM_KWARGS, "--out", directory)
    assert result.code == 0, result
    assert len(symconvert.read_metadata(directory)["layers"]) == 2  # weight_hh_l0, _l1
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randint(0, 50, (8, 1), generator=gen), torch.randint(0, 50, (5, 3), generator=gen)]
    _check_onnx(cli, directory, tmp_path, inputs, packed=False)
    _check_onnx(cli, directory, tmp_path, inputs, packed=True)


def test_mixed_per_layer_schemes_and_every_scheme_packed(tmp_path):
    """Each layer unpacks by its own recorded scheme: spatial, channel+spatial, grouped
    channel, repeat, eigen and quarter in one model, exported packed."""
    from symconvert.io.export import export

    model = symconvert.create_model("py:toy_models:small_cnn", pretrained=False)
    for scheme, include in (("spatial", "stem"), ("channel+spatial", "conv"),
                            ("channel", "grouped"), ("repeat:2", "pointwise"),
                            ("eigen:3", "fc"), ("quarter", "depthwise")):
        symconvert.convert(model, scheme, include=include, include_head=True,
                           allow_empty=scheme == "quarter")
    symconvert.save(model, tmp_path / "mixed")
    schemes = {r["scheme"] for r in symconvert.read_metadata(tmp_path / "mixed")["layers"].values()}
    assert {"spatial", "channel+spatial", "channel", "repeat:2", "eigen:3"} <= schemes
    x = torch.randn(2, 3, 224, 224)
    ref = _reference(tmp_path / "mixed", x)[0]
    for fmt in ("onnx", "torchscript"):
        out = export(symconvert.load(tmp_path / "mixed"), fmt, tmp_path / f"m.{fmt}", packed=True)
        if fmt == "onnx":
            got = _session(out).run(None, {"input": x.numpy()})[0]
        else:
            with torch.no_grad():
                got = torch.jit.load(str(out))(x).numpy()
        assert _rel(got, ref) <= 1e-4, fmt


def test_quarter_tables_are_int32_and_shared(tmp_path):
    """A group without a formula stores one int32 table per (scheme, shape), shared by
    every layer of that shape; the packed file is the checkpoint + 1 % + that table."""
    from symconvert.io.export import export

    model = symconvert.create_model("timm:resnet18", pretrained=False)
    symconvert.convert(model, "quarter", include="layer4.*")
    symconvert.save(model, tmp_path / "q")
    info = deployment_bytes(symconvert.load(tmp_path / "q"))
    assert info["index_bytes"] == 4 * 512 * 512  # layer4's four 512x512 convs share one
    out = export(symconvert.load(tmp_path / "q"), "onnx", tmp_path / "q.onnx", packed=True)
    ckpt = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert out.stat().st_size <= 1.01 * ckpt + info["index_bytes"]
    x = torch.randn(2, 3, 224, 224)
    got = _session(out).run(None, {"input": x.numpy()})[0]
    assert _rel(got, _reference(tmp_path / "q", x)[0]) <= 1e-4


@pytest.mark.parametrize("spec,shape,groups", [
    ("channel", (6, 6, 3, 3), 1), ("channel", (8, 4, 3, 3), 2), ("quarter", (5, 5), 1),
    ("eighth", (6, 6, 1, 1), 1), ("flip", (4, 4, 2, 2), 1), ("spatial", (3, 5, 3, 3), 1),
    ("channel+spatial", (4, 4, 3, 3), 1), ("block", (12, 4), 1), ("block", (4, 12, 3, 3), 1),
    ("block", (16, 4), 4), ("repeat:3", (6, 4, 3, 3), 1), ("repeat:2", (8, 5), 1),
])
def test_gather_tables_rebuild_unpack(spec, shape, groups):
    """P.reshape(-1, C)[rows][:, cols] == scheme.unpack(P) for every permutation scheme,
    with tables per (out, in) position (never per weight element)."""
    scheme = symconvert.get_scheme(spec)
    packed = scheme.pack(torch.randn(shape), groups)
    width, rows, cols = gather_tables(scheme, tuple(packed.shape), shape, groups)
    x = packed.reshape(-1, width)
    if rows is not None:
        assert rows.dtype == torch.int32 and rows.numel() <= shape[0] * shape[1]
        x = x.index_select(0, rows)
    if cols is not None:
        assert cols.dtype == torch.int32 and cols.numel() == math.prod(shape[2:])
        x = x.index_select(1, cols)
    assert torch.equal(x.reshape(shape), scheme.unpack(packed, shape, groups))


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_precision_directory_round_trip(cli, tmp_path, dtype, torch_dtype):
    from safetensors import safe_open

    full, half = tmp_path / "f32", tmp_path / dtype
    base = ["convert", "py:toy_models:small_cnn", "--scheme", "channel", "--no-pretrained"]
    assert cli(*base, "--out", full).code == 0
    result = cli(*base, "--out", half, "--dtype", dtype)
    assert result.code == 0, result
    assert symconvert.read_metadata(half)["dtype"] == dtype
    assert symconvert.read_metadata(full)["dtype"] == "float32"

    def tensors(directory):
        with safe_open(str(directory / "model.safetensors"), framework="pt") as fh:
            return [fh.get_tensor(k) for k in fh.keys()]

    half_tensors, full_tensors = tensors(half), tensors(full)
    floats = [t for t in half_tensors if t.is_floating_point()]
    assert floats and all(t.dtype == torch_dtype for t in floats)
    nbytes = [sum(t.numel() * t.element_size() for t in ts if t.is_floating_point())
              for ts in (half_tensors, full_tensors)]
    assert nbytes[0] * 2 == nbytes[1]
    # the file is the tensors plus a header of the same size either way
    saved = (full / "model.safetensors").stat().st_size - (half / "model.safetensors").stat().st_size
    assert saved >= 0.95 * nbytes[0]
    assert symconvert.load(half)(torch.randn(1, 3, 32, 32)).dtype == torch.float32
    # the same weights stored in half precision (two --no-pretrained converts differ)
    half = symconvert.save(symconvert.load(full), tmp_path / "same", dtype=dtype)
    model = symconvert.load(half)  # float32 compute on CPU by default
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, ref = model.eval()(x), symconvert.load(full).eval()(x)
    assert got.dtype == torch.float32
    assert float((got - ref).abs().max() / ref.abs().max()) < 2e-2  # half storage rounding


def test_packed_half_onnx_stores_half_and_computes_float32(cli, r18_dir, tmp_path):
    out = tmp_path / "r18-fp16.onnx"
    result = cli("export", r18_dir, "--format", "onnx", "--packed", "--dtype", "float16", "--out", out)
    assert result.code == 0, result
    full = tmp_path / "r18.onnx"
    assert cli("export", r18_dir, "--format", "onnx", "--packed", "--out", full).code == 0
    assert out.stat().st_size < 0.6 * full.stat().st_size
    x = torch.randn(1, 3, 224, 224)
    got = _session(out).run(None, {"input": x.numpy()})[0]
    assert got.dtype == np.float32
    assert _rel(got, _reference(r18_dir, x)[0]) < 2e-2


def test_export_bad_usage_is_a_clean_error(cli, r18_dir, tmp_path):
    from conftest import assert_clean_error

    assert_clean_error(cli("export", r18_dir, "--format", "dense", "--packed", "--out",
                           tmp_path / "x.safetensors"), "--packed")
    assert_clean_error(cli("export", r18_dir, "--format", "onnx", "--dtype", "float8", "--out",
                           tmp_path / "x.onnx"), "--dtype")


def test_report_deployment_section(cli, tmp_path):
    """`report` shows the bytes of every export format, measured, and per dtype."""
    import json

    from symconvert.report.render import render_markdown

    directory = tmp_path / "lm"
    wide = ["--model-kwarg", "vocab_size=50", "--model-kwarg", "emb=96", "--model-kwarg", "hidden=96"]
    assert cli("convert", LM, "--scheme", "channel", "--no-pretrained", "--layers", "rnn",
               *wide, "--out", directory, "--dtype", "bfloat16").code == 0
    result = cli("report", directory, "--format", "json", "--latency-runs", "1", "--device", "cpu")
    assert result.code == 0, result
    report = json.loads(result.stdout)
    dep = report["deployment"]
    for key in ("dense_onnx", "packed_onnx", "dense_torchscript", "packed_torchscript"):
        assert isinstance(dep[key], int) and dep[key] > 0, key
    assert dep["packed_onnx"] < dep["dense_onnx"]
    assert dep["stored_dtype"] == "bfloat16"
    assert dep["symconvert"] == (directory / "model.safetensors").stat().st_size
    for dtype in ("float32", "bfloat16", "float16"):
        assert set(dep["by_dtype"][dtype]) >= {"symconvert", "dense", "packed_onnx"}
    assert dep["by_dtype"]["float16"]["symconvert"] < dep["by_dtype"]["float32"]["symconvert"]
    # the stored file is the bfloat16 tensors plus its header
    header = dep["symconvert"] - dep["by_dtype"]["bfloat16"]["symconvert"]
    assert 0 < header < 20_000
    assert "deployment: bytes of what you ship" in render_markdown(report)


@pytest.mark.parametrize("shape,groups,spec", [((8, 4, 3, 3), 2, "channel"), ((16, 4), 4, "channel"),
                                               ((12, 4), 1, "block"), ((4, 12, 3, 3), 1, "block")])
def test_triangle_rows_formula_is_the_transpose_groups_table(shape, groups, spec):
    from symconvert.io.export_packed import _triangle_layout, triangle_rows

    scheme = symconvert.get_scheme(spec)
    packed = scheme.pack(torch.randn(shape), groups)
    _, rows, _ = gather_tables(scheme, tuple(packed.shape), shape, groups)
    layout = _triangle_layout(rows, shape)
    assert layout is not None
    assert torch.equal(triangle_rows(shape[0], shape[1], *layout), rows.long())


def test_finetune_dtype_writes_a_half_precision_directory(cli, tmp_path):
    """`finetune --dtype float16`: trains in float32, writes the model in float16; it
    loads back to the same (rounded) float32 model."""
    import sys

    from conftest import TESTS

    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    conv = tmp_path / "conv"
    assert cli("convert", "py:_helpers_train:tiny_mlp", "--scheme", "channel", "--no-pretrained",
               "--out", conv).code == 0
    out = tmp_path / "ft"
    result = cli("finetune", conv, "--data", "digits", "--epochs", "1", "--device", "cpu",
                 "--no-distill", "--subsample", "200", "--out", out, "--dtype", "float16")
    assert result.code == 0, result
    meta = symconvert.read_metadata(out)
    assert meta["dtype"] == "float16" and meta.get("finetune")
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float16 for t in stored.values() if t.is_floating_point())
    model = symconvert.load(out)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    key = next(k for k, t in stored.items() if t.is_floating_point())
    assert torch.equal(model.state_dict()[key], stored[key].float())


def test_onnxruntime_folds_the_packed_graph_to_the_dense_one(cli, r18_dir, tmp_path):
    """At session creation onnxruntime constant-folds the in-graph unpacking: the
    optimised packed graph has exactly the dense graph's operators (no Gather, Range
    left), so it runs at dense speed."""
    from collections import Counter

    import onnx

    ops = {}
    for packed in (False, True):
        path = tmp_path / f"{packed}.onnx"
        assert cli("export", r18_dir, "--format", "onnx", "--out", path,
                   *(["--packed"] if packed else [])).code == 0
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(tmp_path / f"{packed}-opt.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops[packed] = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert ops[True] == ops[False]
    assert "Gather" not in ops[True] and "Range" not in ops[True]
