"""SPEC sections 2.2, 4 and 5.2-5.3 on small models: convert, the converted layers in
use (train/eval, autocast, compile, optimiser steps, the eval cache), tied weights,
timm's Conv2d subclasses, save/load/fold, and the selection flags."""

from __future__ import annotations

import copy

import pytest
import timm.layers
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize

import symconvert
from symconvert.errors import NothingEligibleError, SymconvertError
from symconvert.schemes import get_scheme
from symconvert.surgery.parametrization import Symmetric, converted_tensors, symmetric_of

SCHEMES = [s.spec for s in symconvert.list_schemes()]  # every registered scheme

# --- layers x schemes: the case matrix -------------------------------------------------
# (name, factory, input shape). Each layer sits alone in a Sequential, so it is also the
# last layer: include_head=True lets the planner consider it.
LAYERS = {
    "conv1d": (lambda: nn.Conv1d(6, 6, 3, padding=1), (2, 6, 9)),
    "conv2d": (lambda: nn.Conv2d(6, 6, 3, padding=1), (2, 6, 7, 7)),
    "conv2d-1x1": (lambda: nn.Conv2d(6, 6, 1), (2, 6, 5, 5)),
    "conv2d-wide": (lambda: nn.Conv2d(6, 12, 3, padding=1), (2, 6, 5, 5)),
    "conv2d-grouped": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=2), (2, 8, 5, 5)),
    "conv2d-depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (2, 6, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(4, 4, 3, padding=1), (1, 4, 4, 4, 4)),
    "linear": (lambda: nn.Linear(6, 6), (3, 6)),
    "linear-tall": (lambda: nn.Linear(6, 18), (3, 6)),
    "linear-wide": (lambda: nn.Linear(18, 6), (3, 18)),
    "timm-StdConv2d": (lambda: timm.layers.StdConv2d(6, 6, 3, padding=1), (2, 6, 5, 5)),
    "timm-Conv2dSame": (lambda: timm.layers.Conv2dSame(6, 6, 3, stride=2), (2, 6, 7, 7)),
    "timm-ScaledStdConv2d": (lambda: timm.layers.ScaledStdConv2d(6, 6, 3, padding=1),
                             (2, 6, 5, 5)),
}


def _dense_reference(layer: nn.Module, scheme, groups: int) -> nn.Module:
    """An unconverted copy of ``layer`` holding the nearest symmetric weight: what the
    converted layer must compute, through the layer class's own forward."""
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        ref.weight.copy_(scheme.project(ref.weight, groups))
    return ref


@pytest.mark.parametrize("spec", SCHEMES)
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_layer_scheme_matrix(layer_name, spec):
    torch.manual_seed(0)
    factory, shape = LAYERS[layer_name]
    layer = factory()
    cls = type(layer)
    model = nn.Sequential(layer)
    scheme = get_scheme(spec)
    groups = getattr(layer, "groups", 1)
    kind = "conv" if isinstance(layer, nn.modules.conv._ConvNd) else "linear"
    reason = scheme.check(tuple(layer.weight.shape), groups) if kind in scheme.kinds else "kind"
    before = symconvert.count_parameters(model)

    if reason is not None:
        plan = symconvert.inspect(model, spec, include_head=True)
        (entry,) = [e for e in plan.layers if e.tensor == "weight"]  # not e.g. a gain
        assert not entry.converted and entry.reason
        with pytest.raises(NothingEligibleError):
            symconvert.convert(model, spec, include_head=True)
        assert symmetric_of(layer) is None  # nothing was touched
        return

    ref = _dense_reference(layer, scheme, groups)
    x = torch.randn(shape)
    model, plan = symconvert.convert(model, spec, include_head=True)
    (entry,) = plan.converted
    free = scheme.free_count(tuple(layer.weight.shape), groups)
    assert entry.params_after == free
    # only the packed tensor is stored: no dense original kept beside it
    assert symconvert.count_parameters(model) == before - entry.params_before + free
    assert plan.total_after == symconvert.count_parameters(model)
    assert [n for n, _ in model.named_parameters()] == [
        n for n, _ in model.named_parameters() if "weight" not in n or "original" in n
    ]
    # the layer keeps its class and its own forward (timm subclasses standardise, pad...)
    assert parametrize.type_before_parametrizations(model[0]) is cls
    assert isinstance(model[0], cls)
    for train in (True, False):
        model.train(train)
        ref.train(train)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    # gradients reach the packed tensor, and a step keeps the weight admissible
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    packed = model[0].parametrizations.weight.original
    assert packed.grad is not None and packed.grad.abs().sum() > 0
    with torch.no_grad():
        w = model[0].weight
        # unpack is a gather, so w is admissible exactly; project averages equal values
        torch.testing.assert_close(scheme.project(w, groups), w, rtol=1e-6, atol=1e-6)


# --- the converted layers in use ---------------------------------------------------------


def _sym_conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                         nn.Flatten(), nn.Linear(6 * 16, 6), nn.Linear(6, 4))


def test_symmetric_through_optimizer_steps():
    # symmetric by construction: no projection after the step is needed, for any optimiser
    model, _ = symconvert.convert(_sym_conv_model(), "channel")
    x = torch.randn(4, 6, 4, 4)
    for opt_cls in (torch.optim.SGD, torch.optim.AdamW):
        opt = opt_cls(model.parameters(), lr=0.1, weight_decay=0.1)
        for _ in range(3):
            opt.zero_grad()
            model(x).logsumexp(1).sum().backward()
            opt.step()
        for module in (model[0], model[2]):
            w = module.weight.detach()
            assert torch.equal(w, w.transpose(0, 1))
        # the 6x96 linear is not square and the 4x6 head is the head: both stay dense
        assert symmetric_of(model[4]) is None and symmetric_of(model[5]) is None


def test_bf16_autocast_on_cpu_trains():
    model, _ = symconvert.convert(_sym_conv_model(), "channel+spatial")
    x = torch.randn(4, 6, 4, 4)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    packed = model[0].parametrizations.weight.original
    assert packed.grad is not None and packed.grad.dtype == torch.float32


def test_bf16_model_converts_and_keeps_dtype():
    model = _sym_conv_model().to(torch.bfloat16)
    model, _ = symconvert.convert(model, "channel")
    assert model[0].parametrizations.weight.original.dtype == torch.bfloat16
    out = model(torch.randn(2, 6, 4, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_torch_compile_matches_eager_and_follows_updates():
    torch._dynamo.reset()
    model, _ = symconvert.convert(_sym_conv_model(), "channel")
    x = torch.randn(2, 6, 4, 4)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    packed = model[0].parametrizations.weight.original
    assert packed.grad is not None
    with torch.no_grad():
        packed.add_(1.0)  # a compiled graph must read the new packed values, not a cache
    torch.testing.assert_close(compiled(x), model(x))


def test_state_dict_round_trip_into_a_fresh_converted_model():
    model, plan = symconvert.convert(_sym_conv_model(), "channel")
    keys = model.state_dict().keys()
    assert "0.parametrizations.weight.original" in keys and "0.weight" not in keys
    assert model.state_dict()["0.parametrizations.weight.original"].numel() == (
        get_scheme("channel").free_count((6, 6, 3, 3))
    )
    torch.manual_seed(1)
    fresh, _ = symconvert.convert(_sym_conv_model().apply(_reinit), "channel")
    x = torch.randn(2, 6, 4, 4)
    assert not torch.allclose(fresh(x), model(x))
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def _reinit(module):
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()


# --- the eval-mode cache ------------------------------------------------------------------


class _CountingScheme:
    """Wraps a scheme and counts the dense weights it rebuilds."""

    def __init__(self, scheme):
        self.inner, self.calls = scheme, 0

    def unpack(self, packed, shape, groups=1):
        self.calls += 1
        return self.inner.unpack(packed, shape, groups)

    def __getattr__(self, name):
        if name == "inner":  # not set yet (copy/deepcopy build the object bare)
            raise AttributeError(name)
        return getattr(self.inner, name)


def _counting(module) -> _CountingScheme:
    sym = symmetric_of(module)
    sym.scheme = _CountingScheme(sym.scheme)
    return sym.scheme


def test_eval_cache_reused_while_params_unchanged_and_invalidated_by_a_step():
    model, _ = symconvert.convert(_sym_conv_model(), "channel")
    counter = _counting(model[0])
    x = torch.randn(2, 6, 4, 4)
    model.eval()
    with torch.no_grad():
        first = model(x)
        model(x)
        model(x)
        assert model[0].weight is model[0].weight  # the very same cached dense tensor
    assert counter.calls == 1

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()
    model(x)
    assert counter.calls == 3  # training rebuilds on every forward (autograd needs it)
    opt.step()

    model.eval()
    with torch.no_grad():
        after = model(x)
        model(x)
    assert counter.calls == 4  # rebuilt once after the step, then reused
    assert not torch.allclose(after, first)
    reference = copy.deepcopy(model)
    symconvert.fold(reference)
    with torch.no_grad():
        torch.testing.assert_close(after, reference(x), rtol=0, atol=0)


def test_eval_cache_invalidated_by_load_state_dict():
    model, _ = symconvert.convert(_sym_conv_model(), "channel")
    other, _ = symconvert.convert(_sym_conv_model().apply(_reinit), "channel")
    counter = _counting(model[0])
    x = torch.randn(2, 6, 4, 4)
    model.eval()
    other.eval()
    with torch.no_grad():
        model(x)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(x), other(x), rtol=0, atol=0)
    assert counter.calls == 2


def test_eval_cache_not_carried_out_of_inference_mode():
    # regression: a weight cached under inference_mode is an inference tensor, which a
    # later grad-enabled forward (input gradients through a frozen model) cannot use
    model, _ = symconvert.convert(_sym_conv_model(), "channel")
    model.eval().requires_grad_(False)
    x = torch.randn(2, 6, 4, 4, requires_grad=True)
    with torch.inference_mode():
        model(x.detach())
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_cache_dropped_by_deepcopy_and_to():
    model, _ = symconvert.convert(_sym_conv_model(), "channel")
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 6, 4, 4))
    assert symmetric_of(model[0])._cache is not None
    assert symmetric_of(copy.deepcopy(model)[0])._cache is None
    model.to(torch.float64)
    assert symmetric_of(model[0])._cache is None
    with torch.no_grad():
        assert model(torch.randn(1, 6, 4, 4, dtype=torch.float64)).dtype == torch.float64


# --- tied and shared weights ------------------------------------------------------------------


def _tied():
    torch.manual_seed(0)
    return symconvert.create_model("py:toy_models:tied_model", pretrained=False)


def test_tied_weights_converted_once_and_still_shared(tmp_path):
    model = _tied()
    before = symconvert.count_parameters(model)
    x = torch.randn(2, 4, 2, 2)
    model, plan = symconvert.convert(model, "channel")
    names = [e.name for e in plan.converted]
    assert names == ["block", "enc"]  # the module called twice appears once; dec is enc's
    assert plan.converted[1].aliases == ["dec"]
    assert model.enc.parametrizations.weight.original is model.dec.parametrizations.weight.original
    saved = 4 * 3 // 2 * 9 + 16 * 15 // 2  # counted once, not once per user
    assert symconvert.count_parameters(model) == plan.total_after == before - saved

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()
    opt.step()
    assert torch.equal(model.enc.weight, model.dec.weight)
    assert torch.equal(model.enc.weight, model.enc.weight.T)

    model.eval()
    with torch.no_grad():
        expected = model(x)
    symconvert.save(model, tmp_path / "tied")
    loaded = symconvert.load(tmp_path / "tied", trust_code=True).eval()
    assert loaded.enc.parametrizations.weight.original is loaded.dec.parametrizations.weight.original
    assert symconvert.count_parameters(loaded) == plan.total_after
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)

    folded = symconvert.fold(loaded)
    assert type(folded.enc) is nn.Linear and type(folded.dec) is nn.Linear
    assert folded.enc.weight is folded.dec.weight
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-6)
    fresh = _tied()
    fresh.load_state_dict(folded.state_dict(), strict=True)


# --- the planner and selection ------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18()


def test_channel_resnet18_parameter_count(resnet18):
    plan = symconvert.inspect(resnet18, "channel")
    assert (plan.total_before, plan.total_after) == (11_689_512, 6_984_168)
    assert round(100 * plan.saved_fraction, 2) == 40.25
    assert plan.total_after == plan.total_before - sum(e.saved for e in plan.converted)


def test_plan_shows_every_candidate_with_a_reason(resnet18):
    plan = symconvert.inspect(resnet18, "channel")
    n_modules = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in resnet18.modules())
    assert len(plan.layers) == n_modules
    for entry in plan.layers:
        assert entry.converted == (entry.reason is None)
        if entry.converted:
            assert entry.params_after == get_scheme("channel").free_count(tuple(entry.shape))
            assert 0 < entry.symmetrization_error < 1
        else:
            assert entry.params_after == entry.params_before


def test_inspect_changes_nothing(resnet18):
    state = {k: v.clone() for k, v in resnet18.state_dict().items()}
    symconvert.inspect(resnet18, "channel")
    assert not list(converted_tensors(resnet18))
    assert all(torch.equal(v, resnet18.state_dict()[k]) for k, v in state.items())


def test_head_excluded_by_default_and_include_head_converts_it(resnet18):
    plan = symconvert.inspect(resnet18, "repeat:2")
    fc = next(e for e in plan.layers if e.module == "fc")
    assert not fc.converted and "head" in fc.reason and "--include-head" in fc.reason
    plan = symconvert.inspect(resnet18, "repeat:2", include_head=True)
    assert next(e for e in plan.layers if e.module == "fc").converted


def test_timm_head_comes_from_pretrained_cfg():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    plan = symconvert.inspect(model, "repeat:2")
    head = next(e for e in plan.layers if e.module == "head")
    assert not head.converted and "head" in head.reason


@pytest.mark.parametrize(
    ("include", "expected"),
    [
        ("layer1.*", {"layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"}),
        (["layer4.0.conv2", "layer4.1.conv*"], {"layer4.0.conv2", "layer4.1.conv1",
                                                 "layer4.1.conv2"}),
        ("re:layer[23]\\.1\\.conv2$", {"layer2.1.conv2", "layer3.1.conv2"}),
    ],
)
def test_include_globs_and_regexes(resnet18, include, expected):
    plan = symconvert.inspect(resnet18, "channel", include=include)
    assert {e.module for e in plan.converted} == expected
    others = [e for e in plan.skipped if e.module not in expected]
    assert any(e.reason == "not matched by --include" for e in others)


def test_exclude_glob_and_regex(resnet18):
    full = {e.module for e in symconvert.inspect(resnet18, "channel").converted}
    plan = symconvert.inspect(resnet18, "channel", exclude=["layer1.*", "re:^layer4"])
    kept = {e.module for e in plan.converted}
    assert kept == {m for m in full if not m.startswith(("layer1.", "layer4"))}
    assert any(e.reason == "excluded by 'layer1.*'" for e in plan.skipped)
    assert not plan.warnings


def test_exclude_matching_nothing_is_a_warning(resnet18):
    plan = symconvert.inspect(resnet18, "channel", exclude=["layer9.*"])
    assert plan.warnings == ["--exclude 'layer9.*' matched no layer"]
    assert len(plan.converted) == len(symconvert.inspect(resnet18, "channel").converted)


def test_layers_flag_and_min_channels(resnet18):
    plan = symconvert.inspect(resnet18, "channel", layers="linear")
    assert not plan.converted and all(
        e.reason == "--layers excludes conv" for e in plan.layers if e.kind == "conv"
    )
    plan = symconvert.inspect(resnet18, "channel", min_channels=128)
    assert plan.converted and all(min(e.shape[:2]) >= 128 for e in plan.converted)
    assert any("--min-channels" in (e.reason or "") for e in plan.skipped)
    with pytest.raises(SymconvertError, match="unknown layer kind"):
        symconvert.inspect(resnet18, "channel", layers="conv,attention")


def test_empty_selection_is_an_error_unless_allow_empty(small_cnn):
    with pytest.raises(NothingEligibleError, match="allow-empty"):
        symconvert.convert(small_cnn, "channel", include="nothing*")
    model, plan = symconvert.convert(small_cnn, "channel", include="nothing*", allow_empty=True)
    assert not plan.converted and not list(converted_tensors(model))


def test_bad_regex_is_a_clear_error(resnet18):
    with pytest.raises(SymconvertError, match="regular expression"):
        symconvert.inspect(resnet18, "channel", include="re:layer[")


def test_target_reduction_reached_with_the_cheapest_layers():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    with torch.no_grad():  # make layer4 nearly symmetric: it should be chosen first
        for name in ("layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"):
            w = model.get_submodule(name).weight
            w.copy_(get_scheme("channel").project(w) + 1e-3 * torch.randn_like(w))
    model, plan = symconvert.convert(model, "channel", target_reduction=0.25)
    channel = get_scheme("channel")
    assert plan.saved_fraction >= 0.25
    assert symconvert.count_parameters(model) == plan.total_after
    full = symconvert.inspect(torchvision.models.resnet18(), "channel")
    assert len(plan.converted) < len(full.converted)  # not simply everything
    not_needed = [e for e in plan.skipped if e.reason == "not needed for --target-reduction"]
    assert not_needed

    def cost(e):  # error per parameter the layer saves when converted
        return e.symmetrization_error / (e.params_before - channel.free_count(tuple(e.shape)))

    assert max(map(cost, plan.converted)) <= min(map(cost, not_needed))
    assert {"layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"} <= {
        e.module for e in plan.converted
    }
    # greedy stops as soon as the goal is met: dropping the last layer misses it
    last = max(plan.converted, key=cost)
    assert plan.saved - last.saved < 0.25 * plan.total_before


def test_target_reduction_unreachable_says_why(resnet18):
    reachable = symconvert.inspect(resnet18, "channel").saved
    with pytest.raises(SymconvertError) as info:
        symconvert.inspect(resnet18, "channel", target_reduction=0.6)
    message = str(info.value)
    # names the goal, the best the selection can do, and what to change
    assert "60.0% cannot be reached" in message and f"saves {reachable:,} of" in message
    assert "--include-head" in message
    with pytest.raises(SymconvertError, match="in \\(0, 1\\)"):
        symconvert.inspect(resnet18, "channel", target_reduction=1.5)


def test_converting_twice_converts_nothing_new(small_cnn):
    model, first = symconvert.convert(small_cnn, "channel")
    after = symconvert.count_parameters(model)
    _, second = symconvert.convert(model, "channel", allow_empty=True)
    assert not second.converted
    assert all("already converted" in e.reason for e in second.skipped
               if e.module in {c.module for c in first.converted})
    assert symconvert.count_parameters(model) == after


def test_small_cnn_plan_matches_the_rules(small_cnn):
    spatial = {e.module: e for e in symconvert.inspect(small_cnn, "spatial").layers}
    assert spatial["depthwise"].converted and spatial["stem"].converted
    assert not spatial["pointwise"].converted and not spatial["fc"].converted
    channel = {e.module: e for e in symconvert.inspect(small_cnn, "channel").layers}
    assert channel["grouped"].converted and channel["grouped"].groups == 2
    assert channel["grouped"].params_after == 2 * (4 * 5 // 2) * 9
    assert not channel["depthwise"].converted and "depthwise" in channel["depthwise"].reason


# --- save / load / fold ---------------------------------------------------------------


def test_save_load_fold_small_cnn(small_cnn, tmp_path):
    model, plan = symconvert.convert(small_cnn, "channel")
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    out = symconvert.save(model, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "symconvert.json"]

    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    assert sum(t.numel() for t in stored.values()) == (
        plan.total_after + sum(b.numel() for b in model.buffers())
    )
    meta = symconvert.read_metadata(out)
    assert meta["layers"]["conv.weight"] == {"scheme": "channel", "shape": [8, 8, 3, 3],
                                             "groups": 1, "aliases": []}
    assert meta["source"]["name"] == "toy_models:small_cnn"
    assert set(meta["versions"]) >= {"symconvert", "torch", "timm", "torchvision"}

    loaded = symconvert.load(out, trust_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    folded = symconvert.fold(loaded)
    assert not list(converted_tensors(folded))
    assert all(not isinstance(m, Symmetric) for m in folded.modules())
    assert type(folded.conv) is nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-6)
    fresh = symconvert.create_model("py:toy_models:small_cnn", pretrained=False)
    fresh.load_state_dict(folded.state_dict(), strict=True)


def test_load_rejects_a_modified_checkpoint(small_cnn, tmp_path):
    model, _ = symconvert.convert(small_cnn, "channel")
    out = symconvert.save(model, tmp_path / "m")
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the last tensor's bytes
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(symconvert.errors.CheckpointError, match="SHA-256"):
        symconvert.load(out, trust_code=True)


def test_save_needs_a_source():
    model, _ = symconvert.convert(_sym_conv_model(), "channel")
    with pytest.raises(SymconvertError, match="source"):
        symconvert.save(model, "/nonexistent-never-written")
