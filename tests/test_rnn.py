"""SPEC section 4, recurrent layers: nn.LSTM / nn.GRU gate blocks (`--layers rnn`,
`--gates hh` or `hh,ih`), and that a converted recurrent layer really trains — the packed
parameters get gradients, the module never keeps using a stale flat weight, the weight
stays symmetric per gate block — and folds back into a plain nn.LSTM."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _helpers_train import one_thread
from torch import nn

import symconvert
from symconvert.surgery.parametrization import converted_tensors

LM = "py:symconvert.models.lstm_lm:lstm_lm"


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


class Wrap(nn.Module):
    """A recurrent layer as a model (the planner works on models)."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def gate_blocks(w: torch.Tensor, gates: int) -> torch.Tensor:
    return w.reshape(gates, w.shape[0] // gates, w.shape[1])


def plan_rows(plan) -> dict[str, tuple[str, str | None]]:
    return {e.name: (e.action, e.reason) for e in plan.layers}


# --- which tensors: targets and reasons ------------------------------------------------


def test_lstm_hh_gate_blocks_are_converted_and_ih_waits_for_gates_ih():
    torch.manual_seed(0)
    model = Wrap(nn.LSTM(12, 16, num_layers=2))
    rows = plan_rows(symconvert.inspect(model, "channel", layers="rnn"))
    assert rows["rnn.weight_hh_l0"] == ("convert", None)
    assert rows["rnn.weight_hh_l1"] == ("convert", None)
    assert rows["rnn.weight_ih_l0"][0] == "skip" and "--gates hh,ih" in rows["rnn.weight_ih_l0"][1]

    plan = symconvert.inspect(model, "channel", layers="rnn", gates="hh,ih")
    rows = plan_rows(plan)
    assert rows["rnn.weight_ih_l1"] == ("convert", None)  # 16 -> 16: square gate blocks
    assert rows["rnn.weight_ih_l0"][0] == "skip" and "not square" in rows["rnn.weight_ih_l0"][1]
    rows = plan_rows(symconvert.inspect(model, "channel", layers="rnn", gates="ih"))
    assert rows["rnn.weight_ih_l1"] == ("convert", None)
    assert "not selected" in rows["rnn.weight_hh_l1"][1]
    hh = next(e for e in plan.layers if e.name == "rnn.weight_hh_l0")
    # four 16x16 gate blocks, each symmetric: 4 * 16*17/2 free parameters
    assert (hh.shape, hh.groups, hh.params_before, hh.params_after) == ([64, 16], 4, 1024, 544)


def test_gru_has_three_gate_blocks_and_plain_rnn_one():
    plan = symconvert.inspect(Wrap(nn.GRU(8, 8)), "channel", layers="rnn", gates="hh,ih")
    assert {e.name: e.groups for e in plan.converted} == {"rnn.weight_hh_l0": 3,
                                                          "rnn.weight_ih_l0": 3}
    assert plan.total_after == plan.total_before - 2 * 3 * (8 * 7 // 2)
    plan = symconvert.inspect(Wrap(nn.RNN(8, 8)), "channel", layers="rnn")
    assert [(e.name, e.groups) for e in plan.converted] == [("rnn.weight_hh_l0", 1)]


def test_bidirectional_layers_convert_both_directions():
    plan = symconvert.inspect(Wrap(nn.LSTM(8, 8, num_layers=2, bidirectional=True)), "channel",
                              layers="rnn", gates="hh,ih")
    rows = plan_rows(plan)
    for name in ("weight_hh_l0", "weight_hh_l0_reverse", "weight_hh_l1", "weight_hh_l1_reverse",
                 "weight_ih_l0", "weight_ih_l0_reverse"):
        assert rows[f"rnn.{name}"] == ("convert", None), name
    # the second layer reads both directions: 2H inputs, not square
    assert "not square" in rows["rnn.weight_ih_l1"][1]


def test_projected_lstm_is_skipped_with_the_reason():
    rows = plan_rows(symconvert.inspect(Wrap(nn.LSTM(8, 8, proj_size=4)), "channel",
                                        layers="rnn"))
    assert rows["rnn.weight_hh_l0"][0] == "skip" and "proj_size=4" in rows["rnn.weight_hh_l0"][1]


def test_layers_rnn_selects_only_recurrent_layers_of_the_lm():
    model = symconvert.create_model(LM, pretrained=False, vocab_size=50, emb=16, hidden=16)
    plan = symconvert.inspect(model, "channel", layers="rnn")
    assert [e.name for e in plan.converted] == ["rnn.weight_hh_l0", "rnn.weight_hh_l1"]
    assert all(e.kind == "rnn" for e in plan.converted)
    assert plan_rows(plan)["decoder"][1] == "--layers excludes linear"


@pytest.mark.parametrize("scheme", ["channel", "block", "quarter", "eigen:3"])
def test_gate_block_schemes_on_lstm_hh(scheme):
    torch.manual_seed(0)
    model = Wrap(nn.LSTM(8, 8))
    model, plan = symconvert.convert(model, scheme, layers="rnn")
    assert [e.name for e in plan.converted] == ["rnn.weight_hh_l0"]
    w = gate_blocks(model.rnn.weight_hh_l0.detach(), 4)
    assert torch.allclose(w, w.transpose(1, 2))
    if scheme == "block":  # the same constraint as channel per gate: the same count
        assert plan.converted[0].params_after == 4 * 8 * 9 // 2
    if scheme == "eigen:3":
        assert all(int(torch.linalg.matrix_rank(b.double(), rtol=1e-5)) <= 3 for b in w)


def test_spatial_does_not_apply_to_rnn():
    plan = symconvert.inspect(Wrap(nn.LSTM(8, 8)), "spatial", layers="rnn")
    assert not plan.converted
    assert "does not apply to rnn" in plan.layers[0].reason


# --- it really trains -----------------------------------------------------------------


def reference_lstm(converted: nn.Module) -> nn.LSTM:
    """A plain nn.LSTM holding the converted module's current dense weights."""
    rnn = converted.rnn
    ref = nn.LSTM(rnn.input_size, rnn.hidden_size, rnn.num_layers,
                  bidirectional=rnn.bidirectional)
    with torch.no_grad():
        for name in rnn._flat_weights_names:
            getattr(ref, name).copy_(getattr(rnn, name))
    return ref


@pytest.mark.parametrize("torch_refreshes", [True, False])
def test_converted_lstm_trains_and_never_uses_a_stale_weight(torch_refreshes, monkeypatch):
    if not torch_refreshes:
        # torch >= 2.0 re-reads changed weights at each forward (_update_flat_weights);
        # earlier versions did not, and pytorch#163784 proposed dropping it again. The
        # handler must not depend on it.
        monkeypatch.setattr(nn.RNNBase, "_update_flat_weights", lambda self: None)
    torch.manual_seed(0)
    model = Wrap(nn.LSTM(8, 8, num_layers=2, bidirectional=True))
    model, plan = symconvert.convert(model, "channel", layers="rnn", gates="hh,ih")
    assert len(plan.converted) == 6  # hh of both layers and directions, ih of layer 0
    x, target = torch.randn(6, 3, 8), torch.randn(6, 3, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    outputs = []
    for _ in range(3):
        y = model(x)
        # the output is exactly that of a plain LSTM with the current dense weights:
        # the module read the parametrized weights, not a cached flat copy
        assert torch.allclose(y, reference_lstm(model)(x)[0], atol=1e-6)
        loss = (y - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for module_name, module, tensor, _ in converted_tensors(model):
            grad = module.parametrizations[tensor].original.grad
            assert grad is not None and grad.abs().sum() > 0, f"{module_name}.{tensor}"
        opt.step()
        outputs.append(y.detach())
    assert not torch.allclose(outputs[0], outputs[-1])  # the steps changed the function
    for name in ("weight_hh_l0", "weight_hh_l1_reverse", "weight_ih_l0_reverse"):
        blocks = gate_blocks(getattr(model.rnn, name).detach(), 4)
        assert torch.equal(blocks, blocks.transpose(1, 2)), name  # still symmetric, exactly


def test_direct_forward_call_without_hooks_reads_the_current_weight():
    torch.manual_seed(0)
    model = Wrap(nn.LSTM(8, 8))
    symconvert.convert(model, "channel", layers="rnn")
    x = torch.randn(5, 2, 8)
    y = model.rnn.forward(x)[0]  # no hooks run
    assert torch.allclose(y, reference_lstm(model)(x)[0], atol=1e-6)
    y.sum().backward()
    assert model.rnn.parametrizations.weight_hh_l0.original.grad.abs().sum() > 0


def test_packed_tensor_is_the_only_trainable_copy_of_the_weight():
    model = Wrap(nn.LSTM(8, 8))
    symconvert.convert(model, "channel", layers="rnn")
    names = [n for n, _ in model.named_parameters()]
    assert "rnn.weight_hh_l0" not in names
    assert "rnn.parametrizations.weight_hh_l0.original" in names
    w = model.rnn.weight_hh_l0  # reads as a dense tensor
    assert type(w) is torch.Tensor and w.shape == (32, 8)
    assert symconvert.count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_flatten_never_sees_graph_carrying_weights(monkeypatch):
    """On CUDA flatten_parameters set_()s every flat weight into one cuDNN buffer; done to
    a weight computed from the packed tensor it rewrites that tensor's autograd history
    (a wrong gradient). The handler flattens only graph-free weights — checked here by
    spying on flatten_parameters, which is a no-op on CPU."""
    torch.manual_seed(0)
    model = Wrap(nn.LSTM(8, 8))
    symconvert.convert(model, "channel", layers="rnn")
    seen: list[bool] = []
    original = nn.LSTM.flatten_parameters

    def spy(self):
        seen.append(any(w is not None and w.grad_fn is not None for w in self._flat_weights))
        return original(self)

    monkeypatch.setattr(nn.LSTM, "flatten_parameters", spy)
    x = torch.randn(4, 2, 8)
    model(x).sum().backward()  # training forward
    with torch.no_grad():
        model(x)               # eval forward (weights from the no-grad cache)
    model.to(torch.float64)    # _apply re-initialises the flat weights
    model(x.double())
    assert seen and not any(seen)


def test_deepcopy_and_dtype_moves_after_training_forward():
    torch.manual_seed(0)
    model = Wrap(nn.GRU(8, 8))
    symconvert.convert(model, "channel", layers="rnn")
    x = torch.randn(4, 2, 8)
    y = model(x)
    y.sum().backward()
    twin = copy.deepcopy(model)  # no graph-carrying tensor left in the module
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
        assert torch.allclose(model.double()(x.double()).float(), y, atol=1e-6)


# --- artifacts: save / load / fold ----------------------------------------------------


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_lm_round_trips_and_folds_into_a_plain_recurrent_layer(rnn_type, tmp_path):
    torch.manual_seed(0)
    model = symconvert.create_model(LM, pretrained=False, vocab_size=40, emb=16, hidden=16,
                                    layers=2, dropout=0.0, rnn_type=rnn_type)
    model, plan = symconvert.convert(model, "channel", layers="rnn", gates="hh,ih")
    assert len(plan.converted) == 4
    # a few steps so that the saved weights are not the conversion's
    tokens = torch.randint(0, 40, (9, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(2):
        logits, _ = model(tokens[:-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 40), tokens[1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        y = model(tokens)[0]

    out = symconvert.save(model, tmp_path / "lm")
    meta = json.loads((out / "symconvert.json").read_text())
    assert set(meta["layers"]) == {e.name for e in plan.converted}
    loaded = symconvert.load(out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], y)

    folded = symconvert.fold(loaded)
    rnn = folded.rnn
    plain = nn.LSTM if rnn_type == "lstm" else nn.GRU
    assert type(rnn) is plain
    assert not rnn._forward_pre_hooks and not rnn._forward_hooks
    assert not {k for k in vars(rnn) if "flat_weights" in k} - {"_flat_weights",
                                                                "_flat_weights_names",
                                                                "_flat_weight_refs"}
    assert all(isinstance(w, nn.Parameter) for w in rnn._flat_weights)
    with torch.no_grad():
        assert torch.allclose(folded(tokens)[0], y, atol=1e-5)
    fresh = plain(16, 16, 2)
    fresh.load_state_dict(rnn.state_dict(), strict=True)
    with torch.no_grad():
        emb = folded.encoder(tokens)
        assert torch.allclose(fresh(emb)[0], rnn(emb)[0], atol=1e-6)
    gates = 4 if rnn_type == "lstm" else 3
    blocks = gate_blocks(fresh.weight_hh_l1.detach(), gates)
    assert torch.equal(blocks, blocks.transpose(1, 2))


def test_cli_inspect_lm_with_gates_hh_ih(cli):
    result = cli("inspect", LM, "--no-pretrained", "--scheme", "channel", "--layers", "rnn",
                 "--gates", "hh,ih", "--format", "json")
    assert result.code == 0, result
    plan = json.loads(result.stdout)
    converted = {row["name"] for row in plan["layers"] if row["action"] == "convert"}
    # the paper's LM: emb == hidden == 650, so the input blocks are square as well
    assert converted == {f"rnn.weight_{k}_l{i}" for k in ("hh", "ih") for i in (0, 1)}
    assert plan["params"]["before"] - plan["params"]["after"] == 4 * 4 * (650 * 649 // 2)


def test_cli_rejects_an_unknown_gate(cli):
    from conftest import assert_clean_error

    result = cli("inspect", LM, "--no-pretrained", "--scheme", "channel", "--gates", "hx")
    assert_clean_error(result, "--gates")


# --- timm architectures with LSTMs ----------------------------------------------------


def test_sequencer2d_s_converts_with_layers_rnn():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("sequencer2d_s", pretrained=False, num_classes=0).eval()
    lstms = [n for n, m in model.named_modules() if isinstance(m, nn.LSTM)]
    model, plan = symconvert.convert(model, "channel", layers="rnn")
    # every LSTM, both directions, hidden-to-hidden (its input blocks are 48x192)
    assert {e.module for e in plan.converted} == set(lstms) and len(lstms) == 36
    assert len(plan.converted) == 2 * len(lstms)
    assert all(e.kind == "rnn" for e in plan.converted)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        y = model(x)
    assert torch.isfinite(y).all() and y.abs().sum() > 0
    model.train()
    model(x).pow(2).sum().backward()
    first = model.get_submodule(lstms[0]).parametrizations.weight_hh_l0.original
    assert first.grad is not None and first.grad.abs().sum() > 0
    model.eval()
    folded = symconvert.fold(model)
    assert all(type(folded.get_submodule(n)) is nn.LSTM for n in lstms)
    with torch.no_grad():
        assert torch.allclose(folded(x), y, atol=1e-5 * float(y.abs().max()))
