"""nn.MultiheadAttention's raw q/k/v weights are planned, converted, folded and saved
(issue 9: they were silently missing from every plan)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import symconvert

TRANSFORMER = "py:trust_models:tiny_transformer"


def _x(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 5, 8, generator=torch.Generator().manual_seed(1))


def test_vit_b_16_block_counts_the_in_proj_weights():
    import torchvision

    model = torchvision.models.vit_b_16(weights=None)
    plan = symconvert.inspect(model, "block", _with_error=False)
    in_proj = [e for e in plan.converted if e.tensor == "in_proj_weight"]
    assert len(in_proj) == 12
    assert all(e.groups == 3 and e.note == "3 blocks 768×768 (stacked)" for e in in_proj)
    # 12 in_proj + 12 out_proj + 24 MLP linears + conv_proj
    assert len(plan.converted) == 49
    assert plan.total_before == 86_567_656
    assert plan.total_after == 43_959_016  # -49.2 %, was -37 % without the in_proj weights


def test_every_weight_of_two_or_more_dims_is_in_the_plan():
    import torchvision

    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                 num_heads=2, hidden_dim=16, mlp_dim=32,
                                                 num_classes=5)
    plan = symconvert.inspect(model, "block")
    planned = {f"{e.module}.{e.tensor}" if e.module else e.tensor for e in plan.layers}
    owned = {name for name, p in model.named_parameters() if p.dim() >= 2}
    assert owned <= planned, owned - planned
    tokens = {e.tensor: e for e in plan.skipped if e.kind == "other"}
    assert set(tokens) == {"class_token", "pos_embedding"}
    assert all("no layer handler" in e.reason for e in tokens.values())


@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_transformer_encoder_converts_folds_and_round_trips(scheme, tmp_path):
    torch.manual_seed(0)
    model = symconvert.create_model(TRANSFORMER, pretrained=False)
    model, plan = symconvert.convert(model, scheme)
    names = {e.name for e in plan.converted}
    assert {"encoder.layers.0.self_attn.in_proj_weight",
            "encoder.layers.1.self_attn.in_proj_weight"} <= names
    attn = model.encoder.layers[0].self_attn
    w = attn.in_proj_weight.detach()
    for q in w.chunk(3):  # q, k and v are each symmetric
        assert torch.equal(q, q.T)
    x = _x()
    model.eval()
    with torch.no_grad():
        assert torch.backends.mha.get_fastpath_enabled()
        y_fast = model(x)  # eval: PyTorch's fused transformer fast path
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            y_slow = model(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    model.train()
    y_train = model(x)  # training: the python path, gradients reach the packed tensor
    y_train.sum().backward()
    assert attn.parametrizations.in_proj_weight.original.grad is not None
    torch.testing.assert_close(y_fast, y_slow, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_train.detach(), y_fast, rtol=1e-4, atol=1e-5)

    symconvert.save(model, tmp_path / "m")
    loaded = symconvert.load(tmp_path / "m", trust_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y_fast, rtol=1e-5, atol=1e-6)
    dense = symconvert.fold(loaded)
    assert type(dense.encoder.layers[0].self_attn) is nn.MultiheadAttention
    assert isinstance(dense.encoder.layers[0].self_attn.in_proj_weight, nn.Parameter)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), y_fast, rtol=1e-5, atol=1e-5)


def test_separate_q_k_v_weights_are_converted_or_skipped_with_reason(tmp_path):
    torch.manual_seed(0)
    model = symconvert.create_model("py:trust_models:kv_attention", pretrained=False)
    plan = symconvert.inspect(model, "channel")
    by_name = {e.name: e for e in plan.layers}
    assert by_name["attn.q_proj_weight"].converted                     # 8x8: square
    assert not by_name["attn.k_proj_weight"].converted                 # 8x16
    assert "not square" in by_name["attn.k_proj_weight"].reason
    assert by_name["attn.v_proj_weight"].converted                     # 8x8
    x = _x()
    model, _ = symconvert.convert(model, "block")  # k (8x16): 2 blocks side by side
    assert {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight"} <= {
        e.name for e in symconvert.inspect(model, "block").skipped
        if e.reason.startswith("already converted")}
    model.eval()
    with torch.no_grad():
        y = model(x)
    symconvert.save(model, tmp_path / "kv")
    loaded = symconvert.load(tmp_path / "kv", trust_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y)
        torch.testing.assert_close(symconvert.fold(loaded)(x), y, rtol=1e-5, atol=1e-5)
