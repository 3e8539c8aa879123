"""Fast forms (issue 23): every converted layer that has one computes the same outputs and
gradients as the dense form of the same packed weights, with fewer FLOPs, in eager, after
save/load, and exported packed to ONNX under onnxruntime."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort  # a dev dependency: missing must fail, not skip
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import symconvert
from symconvert.surgery.fast import dense_forward, fast_modules, fast_reason, is_fast, set_fast

FAST = ["flip", "eighth", "quarter", "repeat:2", "eigen:2"]
LAYERS = {
    "conv1d": (lambda: nn.Conv1d(12, 12, 3, padding=1), (2, 12, 9)),
    "conv1d-nobatch": (lambda: nn.Conv1d(12, 12, 3, padding=1), (12, 9)),
    "conv2d-odd-strided-dilated": (lambda: nn.Conv2d(9, 9, 3, stride=2, padding=2, dilation=2),
                                   (2, 9, 9, 9)),
    "conv2d-grouped": (lambda: nn.Conv2d(12, 12, 3, padding=1, groups=3), (2, 12, 6, 6)),
    "conv2d-same-reflect": (lambda: nn.Conv2d(10, 10, (3, 2), padding="same",
                                              padding_mode="reflect"), (2, 10, 6, 7)),
    "conv2d-1x1-bias-off": (lambda: nn.Conv2d(8, 8, 1, bias=False), (3, 8, 4, 4)),
    "conv3d": (lambda: nn.Conv3d(6, 6, 3, padding=1, stride=(1, 2, 1)), (1, 6, 4, 5, 4)),
    "linear-odd": (lambda: nn.Linear(11, 11), (3, 4, 11)),
    "linear-nobatch": (lambda: nn.Linear(10, 10), (10,)),
}


@pytest.fixture(autouse=True)
def _fast_at_any_width(monkeypatch):
    """The equality tests use small layers: lift the widths below which quarter and eigen
    run dense on CPU (``Scheme.fast_min_width``)."""
    from symconvert.schemes.base import Scheme

    monkeypatch.setattr(Scheme, "fast_min_width", 0)
    for scheme in ("quarter", "eigen:2"):
        monkeypatch.setattr(type(symconvert.get_scheme(scheme)), "fast_min_width", 0)


def test_quarter_and_eigen_run_dense_below_their_width(monkeypatch):
    monkeypatch.undo()
    quarter, eigen = symconvert.get_scheme("quarter"), symconvert.get_scheme("eigen:4")
    assert "from n = 128" in quarter.fast_reason((64, 64, 3, 3))
    assert quarter.fast_reason((128, 128, 3, 3)) is None
    assert quarter.fast_ratio((64, 64, 3, 3)) == 1.0
    assert "from n = 64" in eigen.fast_reason((32, 32, 3, 3))
    assert eigen.fast_ratio((64, 64, 3, 3)) == 8 / 64


def _converted(make, scheme, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(make())
    plan = symconvert.inspect(model, scheme, include_head=True)
    if not plan.converted:
        return None
    symconvert.convert(model, scheme, include_head=True)
    return model


def _packed(model):
    return model[0].parametrizations.weight.original


# repeat:2 needs an even size: the odd layers are not eligible (asserted below)
_NOT_ELIGIBLE = {("repeat:2", "conv2d-odd-strided-dilated"), ("repeat:2", "linear-odd")}


def test_repeat_is_not_eligible_for_odd_sizes():
    for scheme, layer in _NOT_ELIGIBLE:
        assert _converted(LAYERS[layer][0], scheme) is None


@pytest.mark.parametrize("scheme,layer", [(s, la) for s in FAST for la in LAYERS
                                          if (s, la) not in _NOT_ELIGIBLE])
def test_fast_form_equals_dense_in_eval_and_train(scheme, layer):
    make, shape = LAYERS[layer]
    model = _converted(make, scheme)
    assert model is not None, f"{scheme} should be eligible for {layer}"
    reason = fast_reason(model[0])
    # the only eligible layers without a fast form: grouped repeat, eigen with 2K >= n
    assert (reason is None) == (not (scheme.startswith("repeat") and "grouped" in layer)
                                and not (scheme == "eigen:2" and "grouped" in layer)), reason
    assert is_fast(model[0]) == (reason is None)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        fast = model(x)
        fast_again = model(x)  # the cached small weights
        with dense_forward():
            assert not is_fast(model[0])
            dense = model(x)
    assert fast.shape == dense.shape
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast, fast_again)
    # training: the same outputs and the same gradients for the packed tensor and input
    model.train()
    grads = []
    for dense_mode in (False, True):
        xg = x.clone().requires_grad_(True)
        model.zero_grad()
        if dense_mode:
            with dense_forward():
                y = model(xg)
        else:
            y = model(xg)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append((y.detach(), _packed(model).grad.clone(), xg.grad.clone()))
    for got, want in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["channel", "spatial", "channel+spatial", "block"])
def test_schemes_without_a_fast_form_say_so_and_run_dense(scheme):
    model = _converted(lambda: nn.Conv2d(8, 8, 3, padding=1), scheme)
    assert "saves no multiply-adds" in fast_reason(model[0])
    assert not fast_modules(model)


def test_grouped_repeat_and_subclass_forward_are_refused():
    model = _converted(lambda: nn.Conv2d(8, 8, 3, padding=1, groups=2), "repeat:2")
    assert "other input groups" in fast_reason(model[0])

    class Scaled(nn.Conv2d):  # its own forward: a fast form would skip it
        def forward(self, x):
            return 2 * super().forward(x)

    model = _converted(lambda: Scaled(8, 8, 3, padding=1), "flip")
    assert "own forward" in fast_reason(model[0]) and not is_fast(model[0])
    x = torch.randn(1, 8, 5, 5)
    want = 2 * nn.functional.conv2d(x, model[0].weight, model[0].bias, padding=1)
    torch.testing.assert_close(model(x), want)


def _flops(model, x):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("scheme,ratio", [("flip", 1 / 4), ("eighth", 1 / 4), ("quarter", 1 / 2),
                                          ("repeat:4", 1 / 4), ("eigen:2", 2 * 2 / 16)])
def test_flops_of_what_runs(scheme, ratio):
    """torch's flop counter on the fast form: the scheme's own ratio, exactly at stride 1."""
    model = _converted(lambda: nn.Conv2d(16, 16, 3, padding=1, bias=False), scheme).eval()
    x = torch.randn(2, 16, 8, 8)
    dense = 2 * 2 * 16 * 16 * 9 * 8 * 8  # 2 FLOPs per multiply-add, batch 2
    with dense_forward():
        assert _flops(model, x) >= dense  # eigen's dense form also counts V diag(e) Vᵀ
    assert _flops(model, x) == pytest.approx(ratio * dense)
    scheme_obj = symconvert.get_scheme(scheme)
    assert scheme_obj.fast_ratio((16, 16, 3, 3), 1) == pytest.approx(ratio)


def test_state_dict_fold_save_load_and_switch(tmp_path):
    """Names and values of the state_dict are those of the plain parametrization; fold
    gives the dense class back; a saved and loaded model runs its fast form again."""
    torch.manual_seed(0)
    model = symconvert.create_model("py:toy_models:small_cnn", pretrained=False)
    symconvert.convert(model, "flip", include="conv")
    symconvert.convert(model, "quarter", include="grouped")
    symconvert.convert(model, "eigen:3", include="fc", include_head=True)
    assert [n for n, _ in fast_modules(model)] == ["conv", "grouped", "fc"]
    keys = set(model.state_dict())
    assert "conv.parametrizations.weight.original" in keys and "conv.weight" not in keys
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    copied = copy.deepcopy(model)
    assert len(fast_modules(copied)) == 3
    set_fast(copied, False)
    assert not fast_modules(copied) and fast_modules(model)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), want, rtol=1e-5, atol=1e-5)
    symconvert.save(model, tmp_path / "m")
    loaded = symconvert.load(tmp_path / "m").eval()
    assert [n for n, _ in fast_modules(loaded)] == ["conv", "grouped", "fc"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)
    folded = symconvert.fold(loaded)
    assert type(folded.conv) is nn.Conv2d and not fast_modules(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _trust_test_models():
    from symconvert.io.metadata import trusting_code

    with trusting_code():
        yield


def test_packed_onnx_keeps_the_fast_form(tmp_path):
    """``export --format onnx --packed``: onnxruntime runs the small convolutions (a 4x4
    kernel for the flip layer, no 8x8 one) and matches PyTorch."""
    import onnx

    from symconvert.io.export import export

    torch.manual_seed(0)
    model = symconvert.create_model("py:toy_models:small_cnn", pretrained=False)
    for scheme, include in (("flip", "conv"), ("quarter", "grouped"), ("repeat:2", "pointwise"),
                            ("eigen:3", "fc")):
        symconvert.convert(model, scheme, include=include, include_head=True)
    assert len(fast_modules(model)) == 4
    symconvert.save(model, tmp_path / "dir")
    model.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad(), dense_forward():
        want = model(x).numpy()
    out = export(model, "onnx", tmp_path / "m.onnx", packed=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    got = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    graph = onnx.load(options.optimized_model_filepath).graph
    dims = {tuple(i.dims) for i in graph.initializer}
    assert (4, 4, 3, 3) in dims and (8, 8, 3, 3) not in dims, sorted(dims)
    # TorchScript, tensors stored in float16 and computed in float32
    out = export(symconvert.load(tmp_path / "dir"), "torchscript", tmp_path / "m.pt",
                 packed=True, dtype="float16")
    with torch.no_grad():
        got = torch.jit.load(str(out))(x).numpy()
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


class _Stack(nn.Module):
    """Square 3x3 convs of several widths: the FLOPs planner has choices to make."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.head(x.mean((2, 3)))


def test_auto_target_flops_plans_by_the_fast_forms():
    """``--scheme auto --target-flops F``: the plan reaches F of the source's FLOPs, which
    the flop counter then measures on the converted model; errors are clean."""
    from symconvert.errors import SymconvertError

    torch.manual_seed(0)
    x = torch.randn(1, 16, 8, 8)
    total = _flops(_Stack().eval(), x)
    model = _Stack()
    kwargs = {"schemes": "channel,quarter,flip", "target_flops": 0.5, "flops_input": x}
    plan = symconvert.inspect(model, "auto", **kwargs)
    assert plan.reachable and plan.flops_after <= 0.5
    assert all(e.scheme in ("quarter", "flip") for e in plan.converted)  # channel saves none
    symconvert.convert(model, "auto", **kwargs)
    assert _flops(model.eval(), x) == pytest.approx(plan.flops_after * total, rel=1e-6)
    assert _flops(model, x) <= 0.5 * total
    with pytest.raises(SymconvertError, match="flops_input"):
        symconvert.inspect(_Stack(), "auto", schemes="flip", target_flops=0.5)
    with pytest.raises(SymconvertError, match="--scheme auto"):
        symconvert.inspect(_Stack(), "flip", target_flops=0.5, flops_input=x)
    with pytest.raises(SymconvertError, match="cannot be reached"):
        symconvert.convert(_Stack(), "auto", schemes="channel,quarter", target_flops=0.1,
                           flops_input=x)


def test_cli_target_flops_and_flops_column(cli, tmp_path):
    """The CLI counts FLOPs on the task's example input; inspect's last column is the
    per-layer FLOPs ratio; --target-flops with one scheme exits 2 and writes nothing."""
    import json

    result = cli("inspect", "timm:quickstart_digits", "--scheme", "auto", "--schemes",
                 "flip,quarter", "--target-flops", "0.7", "--format", "json")
    assert result.code == 0, result
    plan = json.loads(result.stdout)
    assert plan["auto"]["target_flops"] == 0.7 and plan["auto"]["flops_after"] <= 0.7
    assert {e["flops_ratio"] for e in plan["layers"] if e["action"] == "convert"} <= {0.25, 0.5}
    table = cli("inspect", "timm:quickstart_digits", "--scheme", "flip")
    assert table.code == 0 and "0.25×" in table.stdout
    refused = cli("convert", "timm:quickstart_digits", "--scheme", "flip", "--target-flops",
                  "0.5", "--out", tmp_path / "x")
    assert refused.code == 2 and "--scheme auto" in refused.stderr
    assert not (tmp_path / "x").exists()


def test_eval_cache_follows_in_place_updates():
    model = _converted(lambda: nn.Conv2d(8, 8, 3, padding=1), "flip").eval()
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        before = model(x)
        _packed(model).mul_(2)  # an optimiser step or load_state_dict does the same
        after = model(x)
        with dense_forward():
            torch.testing.assert_close(after, model(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
