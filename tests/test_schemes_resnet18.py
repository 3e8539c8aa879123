"""SPEC sections 3 and 5: each of the nine schemes converts, round-trips and folds
torchvision's resnet18 (random weights: the laws do not need pretrained ones)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from _helpers_train import one_thread
from safetensors.torch import load_file

import symconvert
from symconvert.schemes import list_schemes


@pytest.fixture(autouse=True)
def _one_thread():
    # two xdist workers with 2 MKL threads each on 2 cores spin against each other: the
    # float64 eigh of eigen:16 on layer4 took 12x the CPU time it takes with one thread
    with one_thread():
        yield


SCHEMES = [s.spec for s in list_schemes()]


def test_the_nine_schemes_are_covered():
    assert SCHEMES == ["channel", "spatial", "channel+spatial", "block", "quarter", "eighth",
                       "flip", "repeat:2", "eigen:16"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_converts_folds_and_round_trips_resnet18(scheme, tmp_path):
    torch.manual_seed(0)
    model = symconvert.create_model("torchvision:resnet18", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    model, plan = symconvert.convert(model, scheme)
    assert plan.converted, f"{scheme} converted nothing in resnet18"
    assert symconvert.count_parameters(model) == plan.total_after < plan.total_before
    for entry in plan.converted:
        dense = model.get_submodule(entry.module)
        assert tuple(getattr(dense, entry.tensor).shape) == tuple(entry.shape)  # reads dense
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 1000) and torch.isfinite(y).all()

    # the file holds the free parameters only, and load rebuilds the same function
    out = symconvert.save(model, tmp_path / "m")
    stored = load_file(str(out / "model.safetensors"))
    assert sum(t.numel() for t in stored.values()) == plan.total_after + sum(
        b.numel() for b in model.buffers())
    loaded = symconvert.load(out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), y)

    # fold: plain torchvision resnet18 again, strictly loadable, same outputs
    folded = symconvert.fold(loaded)
    assert type(folded) is torchvision.models.ResNet
    assert not any("parametrizations" in k for k in folded.state_dict())
    fresh = torchvision.models.resnet18().eval()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        z = fresh(x)
    assert torch.allclose(z, y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))
    assert symconvert.count_parameters(fresh) == plan.total_before


def test_channel_resnet18_parameter_count_is_the_specs():
    model = symconvert.create_model("torchvision:resnet18", pretrained=False)
    plan = symconvert.inspect(model, "channel")
    assert (plan.total_before, plan.total_after) == (11_689_512, 6_984_168)

