"""Calibrated conversion (``symconvert.surgery.calibrate``, ``convert --calibrate``): exact fits on
known answers, every scheme x layer kind, and real pretrained models on real data."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import symconvert
from symconvert.surgery.calib_blocks import DEFAULT_STEPS
from symconvert.surgery.calib_costs import calibrated_costs
from symconvert.surgery.calibrate import reestimate_batchnorm


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- known answers


def test_symmetric_source_weight_is_reproduced_exactly():
    """A source whose weights are already symmetric is its own least-squares optimum: the
    calibrated model must reproduce it (weights and outputs) up to solver tolerance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 10))
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight.copy_((conv.weight + conv.weight.transpose(0, 1)) / 2)
    source = copy.deepcopy(model).eval()
    x = torch.randn(128, 6, 5, 5)
    converted, plan = symconvert.convert(copy.deepcopy(model), "channel", calibrate=x,
                                         calibration_samples=128)
    assert [e.name for e in plan.converted] == ["0", "2"]
    for i in (0, 2):
        assert torch.allclose(converted[i].weight, source[i].weight, atol=1e-5)
        assert torch.allclose(converted[i].bias, source[i].bias, atol=1e-5)
    for e in plan.converted:
        assert e.output_error < 1e-3 and e.output_error_naive < 1e-3
    with torch.no_grad():
        assert _rel(converted(x), source(x)) < 1e-4


def _symmetric_basis(n: int) -> list[np.ndarray]:
    out = []
    for i in range(n):
        for j in range(i, n):
            e = np.zeros((n, n))
            e[i, j] = e[j, i] = 1.0
            out.append(e)
    return out


def _closed_form(basis: list[np.ndarray], x: np.ndarray, y: np.ndarray, lam: float = 0.0,
                 wb0: np.ndarray | None = None) -> np.ndarray:
    """argmin over W in span(basis), b of ||x Wᵀ + b - y||² (+ lam ||[W|b] - wb0||²) by an
    explicit design matrix (the damping as extra rows)."""
    cols = [(x @ e.T).reshape(-1) for e in basis]
    m = y.shape[1]
    for k in range(m):  # the bias, one free value per output
        col = np.zeros_like(y)
        col[:, k] = 1.0
        cols.append(col.reshape(-1))
    design, target = np.stack(cols, 1), y.reshape(-1)
    if lam > 0:
        d = basis[0].shape[1]
        extra = [np.concatenate([e, np.zeros((m, 1))], 1).reshape(-1) for e in basis]
        for k in range(m):
            col = np.zeros((m, d + 1))
            col[k, d] = 1.0
            extra.append(col.reshape(-1))
        design = np.concatenate([design, np.sqrt(lam) * np.stack(extra, 1)], 0)
        target = np.concatenate([target, np.sqrt(lam) * wb0.reshape(-1)])
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    w = sum(c * e for c, e in zip(coef[: len(basis)], basis, strict=True))
    return np.concatenate([w, coef[len(basis):, None]], 1)


@pytest.mark.parametrize("damp", [0.0, 0.05])
@pytest.mark.parametrize("scheme,shape", [("channel", (6, 6)), ("block", (12, 6)), ("block", (6, 12))])
def test_linear_least_squares_matches_closed_form(scheme, shape, damp):
    """One Linear layer fed correlated inputs: the calibrated weight and bias equal the
    least-squares optimum over the symmetric subspace computed independently (numpy lstsq
    on an explicit basis of symmetric blocks); with damping, the optimum of the damped
    objective (+ damp · mean(diag H) · ‖[W|b] − [W_src|b_src]‖², H over [x, 1])."""
    torch.manual_seed(1)
    out, inp = shape
    model = nn.Sequential(nn.Linear(inp, out)).double()
    mix = torch.randn(inp, inp, dtype=torch.float64)
    x = torch.randn(400, inp, dtype=torch.float64) @ mix + 0.3  # correlated, non-zero mean
    source = copy.deepcopy(model)
    y = source(x).detach().numpy()
    n = min(shape)
    r = max(shape) // n
    # an explicit basis of "r square symmetric blocks" (stacked or side by side)
    basis = []
    for blk in range(r):
        for e in _symmetric_basis(n):
            full = np.zeros(shape)
            if out >= inp:
                full[blk * n:(blk + 1) * n, :] = e
            else:
                full[:, blk * n:(blk + 1) * n] = e
            basis.append(full)
    xa = np.concatenate([x.numpy(), np.ones((len(x), 1))], 1)
    lam = damp * float(np.mean(np.sum(xa * xa, 0)))
    wb0 = np.concatenate([source[0].weight.detach().numpy(),
                          source[0].bias.detach().numpy()[:, None]], 1)
    expected = _closed_form(basis, x.numpy(), y, lam, wb0)
    # the solver's optimum: CG run to convergence (the default stops within 0.02 % of the
    # error's optimum, test_calib_direct)
    converted, plan = symconvert.convert(copy.deepcopy(model), scheme, include_head=True)
    symconvert.calibrate(converted, source, x, 400, plan=plan, damp=damp, rel_tol=1e-14,
                         max_iter=500)
    got = np.concatenate([converted[0].weight.detach().numpy(),
                          converted[0].bias.detach().numpy()[:, None]], 1)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    entry = plan.converted[0]
    assert entry.output_error < entry.output_error_naive


def test_grouped_conv_least_squares_matches_closed_form():
    """Conv2d, 2 groups, stride 2, padding 1: the fit equals lstsq on F.unfold columns with
    an explicit per-group symmetric basis (the im2col path and the grouping)."""
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2).double()
    model = nn.Sequential(conv)
    x = torch.randn(40, 4, 6, 6, dtype=torch.float64).cumsum(1)  # correlated channels
    source = copy.deepcopy(model)
    y = source(x).detach()
    cols = F.unfold(x, 3, padding=1, stride=2)  # [b, 4*9, L]
    converted, _ = symconvert.convert(copy.deepcopy(model), "channel", include_head=True)
    symconvert.calibrate(converted, source, x, 40, damp=0, rel_tol=1e-14, max_iter=500)
    w = converted[0].weight.detach()
    for g in range(2):
        xg = cols[:, g * 18:(g + 1) * 18].permute(0, 2, 1).reshape(-1, 18).numpy()
        yg = y[:, g * 2:(g + 1) * 2].reshape(40, 2, -1).permute(0, 2, 1).reshape(-1, 2).numpy()
        basis = []
        for e in _symmetric_basis(2):  # symmetric 2x2 channel block, tap by tap
            for tap in range(9):
                full = np.zeros((2, 2, 9))
                full[:, :, tap] = e
                basis.append(full.reshape(2, 18))
        expected = _closed_form(basis, xg, yg)
        got = np.concatenate([w[g * 2:(g + 1) * 2].reshape(2, 18).numpy(),
                              converted[0].bias.detach()[g * 2:(g + 1) * 2, None].numpy()], 1)
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)


def test_calibration_never_worse_than_naive_and_batchnorm_reestimated():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    x = torch.randn(64, 3, 6, 6)
    # running statistics that are the true ones on this data (as a trained model's are)
    reestimate_batchnorm(model, [x])
    source = copy.deepcopy(model)
    converted, plan = symconvert.convert(copy.deepcopy(model), "channel", calibrate=x,
                                         calibration_samples=64)
    assert plan.calibration["samples"] == 64 and plan.calibration["batchnorm_reestimated"] == 3
    for e in plan.converted:
        assert e.output_error <= e.output_error_naive + 1e-9
    naive, _ = symconvert.convert(copy.deepcopy(model), "channel")
    naive.eval()
    with torch.no_grad():
        ys = source(x)
        assert _rel(converted(x), ys) < _rel(naive(x), ys)
    # re-estimation alone: running stats equal the batch statistics of the calibration set
    reestimate_batchnorm(naive, [x])
    with torch.no_grad():
        feats = naive[0](x)
    assert torch.allclose(naive[1].running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    assert not naive[1].training


def test_batchnorm_reestimation_takes_the_first_samples_and_stops_after_the_last_norm():
    """``samples`` caps the inputs re-estimating (the first whole batches holding them);
    after the first batch, each forward stops after the last BatchNorm: the
    layers behind it (here the head) are not run again."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Flatten(),
                          nn.Linear(8 * 36, 4)).eval()
    x = torch.randn(96, 3, 6, 6)
    head_calls = []
    model[6].register_forward_hook(lambda *_: head_calls.append(1))
    assert reestimate_batchnorm(model, list(x.split(32)), samples=50) == 2
    assert len(head_calls) == 1  # the first batch ran whole, the second stopped early
    with torch.no_grad():
        feats = model[0](x[:64])
        later = model[0](x[64:])
    assert torch.allclose(model[1].running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    assert not torch.allclose(model[1].running_mean, later.mean((0, 2, 3)), atol=1e-2)
    assert not model[1].training and not model[4].training


# --------------------------------------------------------------------------- layer kinds


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.st = nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect")
        self.c3 = nn.Conv3d(4, 4, 3, padding=1, bias=False)

    def forward(self, x):
        b = x.shape[0]
        a = torch.relu(self.c1(x.reshape(b, 8, -1))).reshape(x.shape)
        a = self.st(torch.relu(self.dw(torch.relu(self.c2(a)))))
        return self.c3(a.reshape(b, 4, 2, *a.shape[-2:])).flatten(1)


class _Rnn(nn.Module):
    def __init__(self, cls) -> None:
        super().__init__()
        self.rnn = cls(12, 12, num_layers=2, bidirectional=cls is nn.LSTM, batch_first=cls is nn.GRU)
        self.out = nn.Linear(24 if cls is nn.LSTM else 12, 4)

    def forward(self, x):
        return self.out(self.rnn(x)[0])


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.enc(x).mean(1))


KINDS = {
    "conv": (_Convs, (48, 8, 8, 8), {}),
    "lstm": (lambda: _Rnn(nn.LSTM), (48, 6, 12), {"gates": "hh,ih"}),
    "gru": (lambda: _Rnn(nn.GRU), (48, 6, 12), {"gates": "hh,ih"}),
    "transformer": (_Transformer, (48, 7, 16), {}),
}


_SCHEMES = ["channel", "spatial", "channel+spatial", "block", "quarter", "eighth", "flip",
            "repeat:2", "eigen:3"]
# spatial schemes act on conv kernels only
_CASES = [(k, s) for k in sorted(KINDS) for s in _SCHEMES if k == "conv" or "spatial" not in s]


@pytest.mark.parametrize("kind,scheme", _CASES)
def test_every_scheme_and_layer_kind_calibrates(kind, scheme):
    """Every converted tensor gets both errors, the fit never loses to the nearest symmetric
    weight, and the whole model's output moves closer to the source's."""
    torch.manual_seed(4)
    build, shape, options = KINDS[kind]
    model = build().eval()
    x = torch.randn(*shape)
    source = copy.deepcopy(model)
    naive, plan0 = symconvert.convert(copy.deepcopy(model), scheme, **options)
    converted, plan = symconvert.convert(copy.deepcopy(model), scheme, calibrate=x,
                                         calibration_samples=48, **options)
    assert len(plan.converted) == len(plan0.converted)
    for e in plan.converted:  # MultiheadAttention's in_proj_weight included
        assert e.output_error is not None and e.output_error <= e.output_error_naive + 1e-9
    with torch.no_grad():
        ys = source(x)
        if kind in ("lstm", "gru"):
            # gate blocks are fitted one tensor at a time (input, then recurrent weights) on
            # these random sequences the per-tensor gains need not add up for the whole
            # model; it must stay in the naive model's range
            assert _rel(converted(x), ys) <= 1.5 * _rel(naive(x), ys)
        else:
            assert _rel(converted(x), ys) <= _rel(naive(x), ys) + 1e-6


def test_mha_out_proj_is_fitted_despite_functional_call_and_fast_path():
    """nn.MultiheadAttention applies out_proj functionally and the eval fast path skips
    module forwards: calibration still sees (and improves) out_proj, and leaves the
    fast path and the attention module as they were."""
    torch.manual_seed(5)
    model = _Transformer().eval()
    x = torch.randn(64, 7, 16)
    converted, plan = symconvert.convert(copy.deepcopy(model), "channel", include="*out_proj",
                                         calibrate=x, calibration_samples=64)
    names = [e.name for e in plan.converted]
    assert names == ["enc.layers.0.self_attn.out_proj", "enc.layers.1.self_attn.out_proj"]
    assert all(e.output_error < e.output_error_naive for e in plan.converted)
    assert torch.backends.mha.get_fastpath_enabled()
    assert "forward" not in vars(converted.enc.layers[0].self_attn)


class _Attention(nn.Module):
    """Self-attention (one in_proj_weight) or, with kdim, separate q/k/v projections."""

    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=True)
        self.kv = nn.Linear(8, kdim) if kdim else None

    def forward(self, x):
        kv = self.kv(x) if self.kv is not None else x
        return self.attn(x, kv, kv, need_weights=False)[0]


@pytest.mark.parametrize("kdim", [None, 6])
def test_mha_input_projections_fit_exactly_when_already_symmetric(kdim):
    """in_proj_weight (q/k/v stacked) and separate q/k/v_proj_weight are fitted as linears
    on the attention's inputs: a source whose projections already have the symmetry is
    reproduced exactly, and perturbing the symmetry the fit beats the nearest symmetric
    weight."""
    torch.manual_seed(7)
    model = _Attention(kdim).eval()
    mha = model.attn
    # with kdim = 6 the k/v projections are 8 x 6, which `block` cannot hold
    tensors = ["in_proj_weight"] if kdim is None else ["q_proj_weight"]
    groups = 3 if kdim is None else 1  # in_proj_weight: q, k, v as 3 square blocks
    scheme = symconvert.get_scheme("block")
    with torch.no_grad():
        for t in tensors:
            w = getattr(mha, t)
            w.copy_(scheme.unpack(scheme.pack(w.detach(), groups), tuple(w.shape), groups))
    # correlated inputs: with isotropic ones the nearest symmetric weight is already optimal
    x = torch.randn(64, 5, 8) @ (torch.randn(8, 8) * torch.linspace(0.1, 3, 8))
    source = copy.deepcopy(model)
    converted, plan = symconvert.convert(copy.deepcopy(model), "block", include="attn",
                                         calibrate=x, calibration_samples=64)
    assert sorted(e.name for e in plan.converted) == sorted(f"attn.{t}" for t in tensors)
    for e in plan.converted:
        assert e.output_error < 1e-6
    with torch.no_grad():
        assert _rel(converted(x), source(x)) < 1e-5
        for t in tensors:  # perturb the source off the symmetric subspace
            getattr(model.attn, t).add_(0.3 * torch.randn_like(getattr(model.attn, t)))
    converted, plan = symconvert.convert(copy.deepcopy(model), "block", include="attn",
                                         calibrate=x, calibration_samples=64)
    naive, _ = symconvert.convert(copy.deepcopy(model), "block", include="attn")
    for e in plan.converted:
        assert e.output_error < 0.95 * e.output_error_naive
    with torch.no_grad():
        assert _rel(converted(x), model(x)) < _rel(naive(x), model(x))


def test_mha_cross_attention_in_proj_is_kept_naive_and_recorded():
    """A stacked in_proj_weight read by different query and key/value inputs is not one
    linear layer: it stays at the nearest symmetric weight and the record says why."""
    torch.manual_seed(8)

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.kv = nn.Linear(8, 8)

        def forward(self, x):
            return self.attn(x, self.kv(x), self.kv(x), need_weights=False)[0]

    model = Cross().eval()
    x = torch.randn(32, 5, 8)
    _, plan = symconvert.convert(copy.deepcopy(model), "block", include="attn", calibrate=x,
                                 calibration_samples=32)
    (entry,) = plan.converted
    assert entry.name == "attn.in_proj_weight" and entry.output_error is None


def test_calibrated_costs_per_layer_and_scheme():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16, 4))
    x = torch.randn(32, 3, 4, 4)
    before = copy.deepcopy(model.state_dict())
    costs = calibrated_costs(model, x, ["channel", "quarter", "spatial"], samples=32)
    assert set(costs) == {(n, s) for n in ("2", "4") for s in ("channel", "quarter")} | \
        {(n, "spatial") for n in ("0", "2", "4")}
    # fewer free parameters can only fit worse (quarter's subspace lies inside channel's)
    for n in ("2", "4"):
        assert costs[(n, "channel")] <= costs[(n, "quarter")] + 1e-9
    assert all(0 <= v <= 1 for v in costs.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- CLI


def test_cli_convert_calibrate_records_errors(cli, tmp_path):
    out = tmp_path / "qd"
    r = cli("convert", "timm:quickstart_digits", "--scheme", "channel", "--calibrate", "digits",
            "--calibration-samples", "128", "--out", out)
    assert r.code == 0, r
    assert "out. error calib." in r.flat
    meta = json.loads((out / "symconvert.json").read_text())
    cal = meta["calibration"]
    # the three residual blocks are refined as a whole (their BatchNorm affine parameters
    # with them, against the source's statistics); only the stem's BatchNorm is re-estimated
    assert cal["samples"] == 128 and cal["data"] == "digits" and cal["batchnorm_reestimated"] == 1
    assert cal["steps"] == DEFAULT_STEPS and meta["convert"]["calibration_steps"] == DEFAULT_STEPS
    assert meta["convert"]["calibration_mode"] == "block"
    assert sorted(cal["blocks"]) == ["stages.0.0", "stages.1.0", "stages.2.0"]
    for rec in cal["blocks"].values():
        assert rec["output_error"] <= rec["output_error_layerwise"] and rec["steps"] == DEFAULT_STEPS
    assert cal["damp"] == 0.01 and meta["convert"]["calibration_damp"] == 0.01
    # where it computed and the block inputs it held: quickstart_digits' 16 x 8 x 8 blocks
    # inputs, 128 samples, both models (at least 2 x 128 x 16 x 64 floats)
    assert cal["device"] == "cpu" and cal["cache_mib"] >= 2 * 128 * 16 * 64 * 4 / 2**20
    plan = json.loads((out / "plan.json").read_text())
    conv = [e for e in plan["layers"] if e["action"] == "convert"]
    assert len(conv) == 8 and all(e["output_error"] < e["output_error_naive"] for e in conv)
    assert meta["convert"]["calibrate"] == "digits"
    loaded = symconvert.load(out)
    assert symconvert.count_parameters(loaded) < 58538


def test_cli_calibrate_bad_data_is_a_usage_error(cli, tmp_path):
    r = cli("convert", "timm:quickstart_digits", "--scheme", "channel", "--calibrate", "nosuch",
            "--out", tmp_path / "x")
    assert r.code == 2 and "unknown --data source" in r.flat and "Traceback" not in r.output
    r = cli("convert", "timm:quickstart_digits", "--scheme", "channel", "--calibrate", "digits",
            "--calibration-samples", "0", "--out", tmp_path / "y")
    assert r.code == 2 and "--calibration-samples" in r.flat
    for bad in ("-0.5", "nan"):
        r = cli("convert", "timm:quickstart_digits", "--scheme", "channel", "--calibrate",
                "digits", "--calibration-damp", bad, "--out", tmp_path / "z")
        assert r.code == 2 and "--calibration-damp" in r.flat and "Traceback" not in r.output
        assert not (tmp_path / "z").exists()


def test_cli_calibration_mode_layer(cli, tmp_path):
    """--calibration-mode layer: the least-squares fits alone (no block refined), recorded."""
    r = cli("convert", "timm:quickstart_digits", "--scheme", "channel", "--calibrate", "digits",
            "--calibration-samples", "64", "--calibration-mode", "layer", "--out", tmp_path / "l")
    assert r.code == 0, r
    meta = json.loads((tmp_path / "l" / "symconvert.json").read_text())
    assert meta["convert"]["calibration_mode"] == "layer" and meta["convert"]["calibration_steps"] == 0
    assert meta["calibration"]["steps"] == 0 and meta["calibration"]["blocks"] == {}
    r = cli("convert", "timm:quickstart_digits", "--scheme", "channel", "--calibrate", "digits",
            "--calibration-mode", "blocks", "--out", tmp_path / "x")
    assert r.code == 2 and "--calibration-mode" in r.flat and not (tmp_path / "x").exists()


def test_cli_calibration_blocks_pattern(cli, tmp_path):
    """--calibration-blocks: the modules named are refined as blocks (here each stage, an
    nn.Sequential the default does not pick), recorded; a pattern naming no module that holds
    converted layers is a usage error."""
    r = cli("convert", "timm:quickstart_digits", "--scheme", "channel", "--calibrate", "digits",
            "--calibration-samples", "64", "--calibration-steps", "20",
            "--calibration-blocks", r"re:^stages\.\d$", "--out", tmp_path / "b")
    assert r.code == 0, r
    meta = json.loads((tmp_path / "b" / "symconvert.json").read_text())
    assert sorted(meta["calibration"]["blocks"]) == ["stages.0", "stages.1", "stages.2"]
    assert meta["convert"]["calibration_blocks"] == r"re:^stages\.\d$"
    for rec in meta["calibration"]["blocks"].values():
        assert rec["output_error"] <= rec["output_error_layerwise"]
    r = cli("convert", "timm:quickstart_digits", "--scheme", "channel", "--calibrate", "digits",
            "--calibration-blocks", "nosuch*", "--out", tmp_path / "x")
    assert r.code == 2 and "--calibration-blocks" in r.flat and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_cli_calibration_device(cli, tmp_path):
    """--device picks where calibration computes: a device this machine lacks (or one torch
    does not know) is a usage error before any work; cpu calibrates, and the model written
    is the one calibrated on the CPU by default (auto)."""
    bad = "cuda" if not torch.cuda.is_available() else "cuda:99"
    for device in (bad, "tpu0"):
        r = cli("convert", "timm:quickstart_digits", "--scheme", "channel", "--calibrate", "digits",
                "--device", device, "--out", tmp_path / "x")
        assert r.code == 2 and "--device" in r.flat and "Traceback" not in r.output
        assert not (tmp_path / "x").exists()
    r = cli("convert", "timm:quickstart_digits", "--scheme", "channel", "--calibrate", "digits",
            "--calibration-samples", "64", "--calibration-steps", "0", "--device", "cpu",
            "--out", tmp_path / "cpu")
    assert r.code == 0, r
    model = symconvert.create_model("timm:quickstart_digits", pretrained=True)
    source = copy.deepcopy(model)
    symconvert.convert(model, "channel")
    result = symconvert.calibrate(model, source, "digits", 64, steps=0, device="auto")
    assert all(p.device.type == "cpu" for p in model.parameters())
    saved = json.loads((tmp_path / "cpu" / "symconvert.json").read_text())["calibration"]["layers"]
    for name, rec in result.layers.items():
        assert saved[name]["output_error"] == pytest.approx(rec["output_error"], rel=1e-6)


def test_cli_inspect_calibrate_shows_both_errors(cli):
    r = cli("inspect", "timm:quickstart_digits", "--scheme", "channel", "--calibrate", "digits",
            "--calibration-samples", "64", "--format", "json")
    assert r.code == 0, r
    plan = json.loads(r.stdout)
    conv = [e for e in plan["layers"] if e["action"] == "convert"]
    assert conv and all(e["output_error"] is not None for e in conv)
    assert plan["calibration"]["samples"] == 64


# --------------------------------------------------------------------------- real models


def _top1(model, data="digits", subsample=None):
    from symconvert.train.evaluate import evaluate

    return evaluate(model, data, subsample=subsample)["top1"]


def test_quickstart_digits_calibrated_far_above_naive():
    """Real pretrained digits classifier, channel, 256 calibration images of the train
    split; top-1 on the 360 test images. Measured: source 99.7 %, naive 9.7 %,
    calibrated 99.2 %."""
    model = symconvert.create_model("timm:quickstart_digits", pretrained=True)
    naive, _ = symconvert.convert(copy.deepcopy(model), "channel")
    calibrated, _ = symconvert.convert(copy.deepcopy(model), "channel", calibrate="digits",
                                       calibration_samples=256)
    acc_naive, acc_cal = _top1(naive), _top1(calibrated)
    assert acc_naive < 0.3
    assert acc_cal > 0.95 and acc_cal - acc_naive > 0.6


@pytest.mark.slow
def test_fashion_vit_calibrated_far_above_naive_and_damping_generalises():
    """Real pretrained ViT (nn.TransformerEncoder), `block` on every projection (the
    attention's in_proj_weight included), 256 calibration images, top-1 on 1,000 test
    images. Layer by layer (--calibration-steps 0) both the damped and the undamped fits are
    far above naive; block-wise calibration (the default) then scores at least as well.
    Measured: source 83.7 %, naive 31.9 %, layer-wise with the default damping 83.0 %,
    without 83.2 % (the CG solver before the exact ones over-fitted undamped: 79.1 %),
    block-wise 83.3 %."""
    model = symconvert.create_model("timm:fashion_vit", pretrained=True)
    naive, _ = symconvert.convert(copy.deepcopy(model), "block")
    calibrated, plan = symconvert.convert(copy.deepcopy(model), "block",
                                          calibrate="fashion-mnist", calibration_samples=256)
    layerwise, _ = symconvert.convert(copy.deepcopy(model), "block", calibrate="fashion-mnist",
                                      calibration_samples=256, calibration_steps=0)
    undamped, _ = symconvert.convert(copy.deepcopy(model), "block", calibrate="fashion-mnist",
                                     calibration_samples=256, calibration_damp=0,
                                     calibration_steps=0)
    assert any(e.name.endswith("in_proj_weight") for e in plan.converted)
    assert all(e.output_error < e.output_error_naive for e in plan.converted)
    acc_src = _top1(model, "fashion-mnist", 1000)
    acc_naive, acc_cal = _top1(naive, "fashion-mnist", 1000), _top1(calibrated, "fashion-mnist", 1000)
    acc_layer = _top1(layerwise, "fashion-mnist", 1000)
    acc_undamped = _top1(undamped, "fashion-mnist", 1000)
    assert acc_cal - acc_naive > 0.3 and acc_cal > acc_src - 0.025
    assert acc_undamped - acc_naive > 0.3 and acc_layer >= acc_undamped - 0.01
    assert acc_cal >= acc_layer - 0.005, (acc_cal, acc_layer)


@pytest.mark.slow
def test_fashion_resnet_calibrated_far_above_naive():
    """Real pretrained CIFAR-style ResNet on Fashion-MNIST, `channel` (14 square convs,
    −48 % parameters), 256 calibration images, top-1 on 1,000 test images. Measured with
    512 images on 2,000 test images: source 86.6 %, naive 10.0 %, naive + BatchNorm
    re-estimation 35.5 %, calibrated 79.8 %."""
    model = symconvert.create_model("timm:fashion_resnet", pretrained=True)
    naive, _ = symconvert.convert(copy.deepcopy(model), "channel")
    calibrated, plan = symconvert.convert(copy.deepcopy(model), "channel",
                                          calibrate="fashion-mnist", calibration_samples=256)
    assert len(plan.converted) == 14
    acc_naive = _top1(naive, "fashion-mnist", 1000)
    acc_cal = _top1(calibrated, "fashion-mnist", 1000)
    assert acc_naive < 0.2 and acc_cal > 0.65 and acc_cal - acc_naive > 0.5


@pytest.mark.slow
def test_calibrate_then_short_finetune_beats_uncalibrated_at_equal_budget(tmp_path):
    """The same fine-tune (1 epoch of the 1,437 digits training images, defaults) from the
    naive and from the calibrated conversion: the calibrated start ends higher."""
    from symconvert.train.run import finetune

    model = symconvert.create_model("timm:quickstart_digits", pretrained=True)
    naive, _ = symconvert.convert(copy.deepcopy(model), "quarter")
    calibrated, _ = symconvert.convert(copy.deepcopy(model), "quarter", calibrate="digits",
                                       calibration_samples=512)
    scores = {}
    for name, m in (("naive", naive), ("calibrated", calibrated)):
        symconvert.save(m, tmp_path / name)
        finetune(tmp_path / name, "digits", tmp_path / f"{name}-ft", epochs=1, progress=False)
        scores[name] = _top1(symconvert.load(tmp_path / f"{name}-ft"))
    assert scores["calibrated"] > scores["naive"] + 0.02, scores


def test_target_reduction_ranks_by_calibrated_error():
    """With calibration data, --target-reduction keeps the layers with the lowest
    calibrated output error per parameter saved (not the lowest weight error)."""
    torch.manual_seed(7)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())],
                          nn.Flatten(), nn.Linear(8 * 16, 4)).eval()
    x = torch.randn(64, 8, 4, 4)
    costs = calibrated_costs(model, x, ["channel"], samples=64)
    _, plan = symconvert.convert(copy.deepcopy(model), "channel", calibrate=x,
                                 calibration_samples=64, target_reduction=0.2)
    chosen = {e.name for e in plan.converted}
    ranked = sorted((n for n, _ in costs), key=lambda n: costs[(n, "channel")])
    assert chosen == set(ranked[: len(chosen)]) and 0 < len(chosen) < 4
    assert plan.saved_fraction >= 0.2


@pytest.mark.slow
def test_default_finetune_does_not_knock_a_calibrated_start_back(tmp_path):
    """A recovery fine-tune must not make a good start worse in its first steps: from the
    calibrated digits model (`quarter`), with the default settings, top-1 on the 360 test
    images after each of the first 8 optimiser steps stays within three images of the start,
    and the epoch ends no lower. Measured (block-wise calibration): start 98.9 %, steps 1-8
    98.3-98.9 % (98.1 % at one step with the exact solvers); from the layer-wise start (96.1 %) with the old defaults (lr 0.01, no
    warm-up) it fell to 94.7 %, with lr 0.02 and a 0.1-epoch warm-up (2 steps) to 92.8 %."""
    from symconvert.train.config import FinetuneConfig, task_config
    from symconvert.train.loop import fit
    from symconvert.train.optim import auto_warmup_epochs

    assert auto_warmup_epochs(2, 23) == pytest.approx(20 / 23)  # at least 20 steps
    assert auto_warmup_epochs(2, 5000) == pytest.approx(0.1)
    assert auto_warmup_epochs(1, 10) == pytest.approx(0.5)  # at most half the run
    source = symconvert.create_model("timm:quickstart_digits", pretrained=True)
    model, _ = symconvert.convert(copy.deepcopy(source), "quarter", calibrate="digits",
                                  calibration_samples=512)
    start = _top1(model)
    seen: list[float] = []

    def on_step(epoch, step, loss):
        if len(seen) < 8:
            model.eval()
            seen.append(_top1(model))
            model.train()

    config = FinetuneConfig(**task_config("digits", {"epochs": 1, "device": "cpu"}))
    assert config.warmup_epochs is None and config.lr == 0.02 and not config.augment
    fit(model, "digits", tmp_path / "ft", config, teacher=source, progress=False,
        on_step=on_step)
    assert len(seen) == 8 and min(seen) >= start - 3.5 / 360, (start, seen)
    end = _top1(model)
    assert end >= start - 0.5 / 360, (start, end)
