"""SPEC section 2 and issue 2's acceptance, through the command line: `schemes`,
`inspect`, `convert`, `export`, the MODEL strings and weights files, and every bad input
(exit 2, one paragraph, no traceback, nothing half-written)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from conftest import assert_clean_error, run_cli

import symconvert
from symconvert.schemes import get_scheme

R101_BEFORE, R101_AFTER = 44_549_160, 33_911_592


def _totals(result) -> tuple[int, int, str, int]:
    """(before, after, saved %, layers converted) from the totals line of the output."""
    m = re.search(r"(\d+) layers converted, \d+ skipped; parameters ([\d,]+) → ([\d,]+) "
                  r"\(−([\d.]+)%\)", result.flat)
    assert m, result
    return int(m[2].replace(",", "")), int(m[3].replace(",", "")), m[4], int(m[1])


def _rel_close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    err = (a - b).abs().max() / b.abs().max()
    assert err <= rel, f"max abs diff {err:.2e} of max |output| (allowed {rel:.0e})"


def _paper_counts(model: torch.nn.Module) -> tuple[int, int, int]:
    """(before, after, layers) computed by hand: every square conv/linear outside the
    head keeps n(n+1)/2 of its n*n entries per tap (the paper's arithmetic)."""
    before = sum(p.numel() for p in model.parameters())
    saved, layers = 0, 0
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.in_channels == m.out_channels:
            n, taps = m.in_channels, m.kernel_size[0] * m.kernel_size[1]
            saved += n * (n - 1) // 2 * taps
            layers += 1
    return before, before - saved, layers


# --- issue 2 acceptance: resnet101 -------------------------------------------------------

r101 = pytest.mark.xdist_group("resnet101")


@r101
def test_channel_resnet101_parameter_count(resnet101_channel_dir):
    out, result = resnet101_channel_dir
    assert result.code == 0, result
    before, after, pct, layers = _totals(result)
    assert (before, after, pct, layers) == (R101_BEFORE, R101_AFTER, "23.88", 34)
    with torch.device("meta"):
        assert _paper_counts(torchvision.models.resnet101()) == (R101_BEFORE, R101_AFTER, 34)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["params"] == {"before": R101_BEFORE, "after": R101_AFTER,
                              "saved_fraction": pytest.approx(1 - R101_AFTER / R101_BEFORE)}
    assert plan["converted"] == 34
    assert f"wrote {out}" in result.flat


@r101
def test_channel_timm_resnet101_parameter_count(tmp_path):
    result = run_cli("convert", "timm:resnet101", "--scheme", "channel", "--no-pretrained",
                     "--out", tmp_path / "X", "--format", "json")
    assert result.code == 0, result
    plan = json.loads(result.stdout)
    assert (plan["params"]["before"], plan["params"]["after"], plan["converted"]) == (
        R101_BEFORE, R101_AFTER, 34)
    assert f"{plan['params']['saved_fraction']:.2%}" == "23.88%"


@r101
def test_resnet101_checkpoint_is_really_smaller(resnet101_channel_dir):
    out, _ = resnet101_channel_dir
    size = (out / "model.safetensors").stat().st_size
    with torch.device("meta"):
        buffers = list(torchvision.models.resnet101().buffers())
    float_buffers = sum(b.numel() for b in buffers if b.is_floating_point())
    buffer_bytes = sum(b.numel() * b.element_size() for b in buffers)
    assert float_buffers == 105_344  # BN running means and variances the file must hold
    payload = R101_AFTER * 4 + buffer_bytes  # free parameters + BN statistics, fp32
    # the honest bound: only the payload plus the header (SPEC 5.1: <= 0.1 % over)
    assert payload <= size <= 1.001 * payload + 64 * 1024
    print(f"\nresnet101 channel: model.safetensors {size:,} bytes = "
          f"{size / (R101_AFTER * 4):.5f} x free params x 4 "
          f"({size / payload:.5f} x (free params + buffers))")


@r101
def test_resnet101_load_fold_loads_strictly_into_torchvision(resnet101_channel_dir):
    out, _ = resnet101_channel_dir
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model = symconvert.load(out).eval()
    assert symconvert.count_parameters(model) == R101_AFTER
    with torch.no_grad():
        converted = model(x)
    folded = symconvert.fold(model)
    fresh = torchvision.models.resnet101()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    fresh.eval()
    assert all(type(m) is type(f) for m, f in zip(folded.modules(), fresh.modules(), strict=True))
    with torch.no_grad():
        _rel_close(fresh(x), converted, 1e-5)
    # symmetric where the plan says, untouched where it does not
    w = fresh.layer3[5].conv2.weight
    assert torch.equal(w, w.transpose(0, 1))
    assert not torch.equal(fresh.layer3[5].conv1.weight[:256, :256, 0, 0],
                           fresh.layer3[5].conv1.weight[:256, :256, 0, 0].T)


# --- issue 2 acceptance: vit block counts, convnext nothing eligible, resnet18 ------------


def test_inspect_vit_small_block_lists_qkv_and_mlp_with_block_counts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("inspect", "timm:vit_small_patch16_224", "--scheme", "block",
                     "--no-pretrained")
    assert result.code == 0, result
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines()
            if line.startswith("│")}
    expected = {"attn.qkv": ("1152×384", "3 blocks 384×384"),
                "mlp.fc1": ("1536×384", "4 blocks 384×384"),
                "mlp.fc2": ("384×1536", "4 blocks 384×384")}
    for i in range(12):
        for layer, (shape, blocks) in expected.items():
            row = rows[f"blocks.{i}.{layer}"]
            assert "convert" in row and shape in row and blocks in row, row
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing

    result = run_cli("inspect", "timm:vit_small_patch16_224", "--scheme", "block",
                     "--no-pretrained", "--format", "json")
    layers = {e["name"]: e for e in json.loads(result.stdout)["layers"]}
    qkv = layers["blocks.3.attn.qkv"]
    assert qkv["action"] == "convert" and qkv["note"].startswith("3 blocks")
    assert qkv["params_after"] == get_scheme("block").free_count((1152, 384)) == 3 * 384 * 385 // 2
    assert layers["head"]["action"] == "skip"


def test_convert_convnext_atto_channel_explains_nothing_eligible(tmp_path):
    out = tmp_path / "X"
    result = run_cli("convert", "timm:convnext_atto", "--scheme", "channel", "--no-pretrained",
                     "--out", out)
    assert_clean_error(result, "converts no layer", "depthwise", "not square", "--allow-empty")
    assert not out.exists()

    result = run_cli("convert", "timm:convnext_atto", "--scheme", "channel", "--no-pretrained",
                     "--out", out, "--allow-empty")
    assert result.code == 0, result
    before, after, _, layers = _totals(result)
    assert before == after and layers == 0
    assert symconvert.count_parameters(symconvert.load(out)) == before


@pytest.fixture(scope="module")
def resnet18_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("r18") / "r18-channel"
    result = run_cli("convert", "torchvision:resnet18", "--scheme", "channel", "--no-pretrained",
                     "--out", out)
    return out, result


r18 = pytest.mark.xdist_group("resnet18")


@r18
def test_channel_resnet18_parameter_count(resnet18_dir):
    _, result = resnet18_dir
    assert result.code == 0, result
    before, after, pct, layers = _totals(result)
    with torch.device("meta"):
        hand = _paper_counts(torchvision.models.resnet18())
    assert (before, after, layers) == hand == (11_689_512, 6_984_168, 13)
    assert pct == "40.25"


# --- export ------------------------------------------------------------------------------


@r18
def test_export_dense_loads_strictly_into_plain_torchvision(resnet18_dir, tmp_path, cli):
    out, _ = resnet18_dir
    x = torch.randn(2, 3, 64, 64)
    converted = symconvert.load(out).eval()
    with torch.no_grad():
        expected = converted(x)
    dense = tmp_path / "dense.safetensors"
    result = cli("export", out, "--format", "dense", "--out", dense)
    assert result.code == 0, result
    from safetensors.torch import load_file

    plain = torchvision.models.resnet18()
    plain.load_state_dict(load_file(str(dense)), strict=True)
    with torch.no_grad():
        _rel_close(plain.eval()(x), expected, 1e-5)
    # export never overwrites silently
    assert_clean_error(cli("export", out, "--format", "dense", "--out", dense), "--overwrite")


@r18
def test_export_torchscript_output_equals(resnet18_dir, tmp_path, cli):
    out, _ = resnet18_dir
    path = tmp_path / "m.pt"
    result = cli("export", out, "--format", "torchscript", "--out", path)
    assert result.code == 0, result
    scripted = torch.jit.load(str(path)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        _rel_close(scripted(x), symconvert.load(out).eval()(x), 1e-5)


@r18
def test_export_onnx_is_a_valid_model(resnet18_dir, tmp_path, cli):
    import onnx

    out, _ = resnet18_dir
    path = tmp_path / "m.onnx"
    result = cli("export", out, "--format", "onnx", "--out", path)
    assert result.code == 0, result
    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input][:1] == ["input"]
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime

        x = torch.randn(2, 3, 224, 224)
        session = onnxruntime.InferenceSession(str(path))
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            _rel_close(torch.from_numpy(got), symconvert.load(out).eval()(x), 1e-4)


def test_export_dense_of_a_timm_conv2dsame_model_loads_into_plain_timm(tmp_path, cli):
    # tf_efficientnet: timm's Conv2dSame convs (depthwise ones converted by `spatial`)
    out = tmp_path / "eff"
    result = cli("convert", "timm:tf_efficientnet_b0", "--scheme", "spatial", "--no-pretrained",
                 "--out", out)
    assert result.code == 0, result
    assert _totals(result)[3] > 0
    dense = tmp_path / "eff.safetensors"
    assert cli("export", out, "--format", "dense", "--out", dense).code == 0
    from safetensors.torch import load_file

    x = torch.randn(1, 3, 64, 64)
    plain = timm.create_model("tf_efficientnet_b0", pretrained=False).eval()
    plain.load_state_dict(load_file(str(dense)), strict=True)
    with torch.no_grad():
        _rel_close(plain(x), symconvert.load(out).eval()(x), 1e-5)
    w = plain.blocks[1][0].conv_dw.weight
    assert type(plain.blocks[1][0].conv_dw).__name__ == "Conv2dSame"
    assert torch.equal(w, w.transpose(2, 3))


# --- MODEL strings and weights files ------------------------------------------------------


def test_py_model_converts_and_loads(tmp_path, cli):
    out = tmp_path / "toy"
    result = cli("convert", "py:toy_models:small_cnn", "--scheme", "channel", "--out", out)
    assert result.code == 0, result
    meta = json.loads((out / "symconvert.json").read_text())
    assert meta["source"]["library"] == "py" and meta["source"]["name"] == "toy_models:small_cnn"
    with pytest.raises(symconvert.SymconvertError, match="trust-code"):
        symconvert.load(out)  # a recorded py: source runs code: opt-in only
    model = symconvert.load(out, trust_code=True)
    assert symconvert.count_parameters(model) == _totals(result)[1]


@pytest.mark.parametrize(
    ("model", "message"),
    [("py:toy_models:not_a_module", "not an nn.Module"),
     ("py:toy_models:no_such_function", "no callable"),
     ("py:no_such_module_xyz:f", "PYTHONPATH"),
     ("py:toy_models", "py:package.module:function")],
)
def test_bad_py_model_is_exit_2(model, message, tmp_path, cli):
    out = tmp_path / "X"
    assert_clean_error(cli("convert", model, "--scheme", "channel", "--out", out), message)
    assert not out.exists()


def test_bare_names_print_the_chosen_library(cli):
    # documented order: timm first (it has resnet18), then torchvision (squeezenet)
    assert timm.is_model("resnet18") and not timm.is_model("squeezenet1_0")
    result = cli("inspect", "resnet18", "--scheme", "channel", "--no-pretrained", "--format", "json")
    assert result.code == 0, result
    assert "resolved resnet18 → timm:resnet18" in result.flat
    result = cli("inspect", "squeezenet1_0", "--scheme", "spatial", "--no-pretrained",
                 "--format", "json")
    assert result.code == 0, result
    assert "resolved squeezenet1_0 → torchvision:squeezenet1_0" in result.flat
    assert json.loads(result.stdout)["converted"] > 0


def test_num_classes_replaces_the_head(tmp_path, cli):
    out = tmp_path / "X"
    result = cli("convert", "timm:resnet18", "--scheme", "channel", "--no-pretrained",
                 "--num-classes", "7", "--out", out)
    assert result.code == 0, result
    model = symconvert.load(out)
    assert model.fc.out_features == 7
    assert symconvert.read_metadata(out)["source"]["num_classes"] == 7


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    """A resnet18 state_dict saved as a DDP + torch.compile checkpoint would be."""
    torch.manual_seed(123)
    state = torchvision.models.resnet18().state_dict()
    root = tmp_path_factory.mktemp("weights")
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}},
               root / "r18.pth")
    from safetensors.torch import save_file

    save_file({f"module.{k}": v.contiguous() for k, v in state.items()},
              str(root / "r18.safetensors"))
    return root, state


@r18
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_weights_file_with_prefixes_is_loaded(resnet18_weights, fmt, tmp_path, cli):
    root, state = resnet18_weights
    out = tmp_path / "X"
    result = cli("convert", "torchvision:resnet18", "--scheme", "channel",
                 "--weights", root / f"r18.{fmt}", "--out", out)
    assert result.code == 0, result
    folded = symconvert.fold(symconvert.load(out)).state_dict()
    channel = get_scheme("channel")
    # converted layers hold the nearest symmetric weight of the FILE's weight; the rest
    # is the file's exactly
    torch.testing.assert_close(folded["layer2.1.conv2.weight"],
                               channel.project(state["layer2.1.conv2.weight"]))
    for key in ("conv1.weight", "layer2.0.downsample.0.weight", "bn1.running_var", "fc.weight"):
        assert torch.equal(folded[key], state[key]), key


@r18
def test_weights_file_with_num_classes_keeps_the_body(resnet18_weights, tmp_path, cli):
    root, state = resnet18_weights
    out = tmp_path / "X"
    result = cli("convert", "torchvision:resnet18", "--scheme", "channel", "--num-classes", "10",
                 "--weights", root / "r18.safetensors", "--out", out)
    assert result.code == 0, result
    folded = symconvert.fold(symconvert.load(out)).state_dict()
    assert folded["fc.weight"].shape == (10, 512)
    assert torch.equal(folded["conv1.weight"], state["conv1.weight"])


# --- bad input: exit 2, a clear paragraph, no traceback, nothing written -----------------


def test_unknown_model_shows_close_matches(tmp_path, cli):
    out = tmp_path / "X"
    result = cli("convert", "timm:resnet1O1", "--scheme", "channel", "--out", out)
    assert_clean_error(result, "no model named 'resnet1O1'", "Close matches: resnet101")
    result = cli("inspect", "resnet5O", "--scheme", "channel")
    assert_clean_error(result, "in timm or torchvision", "resnet50")
    assert result.flat.count("resnet50,") == 1  # both libraries have it: suggested once
    assert_clean_error(cli("inspect", "foo:bar"), "unknown model source 'foo'")
    assert not out.exists()


def test_unknown_scheme_is_exit_2(tmp_path, cli):
    out = tmp_path / "X"
    result = cli("convert", "py:toy_models:small_cnn", "--scheme", "chanel", "--out", out)
    assert_clean_error(result, "unknown scheme 'chanel'", "Did you mean channel")
    assert not out.exists()
    assert_clean_error(cli("inspect", "py:toy_models:small_cnn", "--scheme", "repeat:0"), "R >= 2")


def test_unreachable_target_reduction_is_exit_2(tmp_path, cli):
    out = tmp_path / "X"
    result = cli("convert", "py:toy_models:small_cnn", "--scheme", "channel",
                 "--target-reduction", "0.9", "--out", out)
    assert_clean_error(result, "90.0% cannot be reached")
    assert not out.exists()


def test_exclude_matching_nothing_warns(cli):
    result = cli("inspect", "py:toy_models:small_cnn", "--scheme", "channel",
                 "--exclude", "nothing.*")
    assert result.code == 0, result
    assert "warning: --exclude 'nothing.*' matched no layer" in result.flat


@pytest.fixture
def toy_dir(tmp_path):
    out = tmp_path / "toy"
    assert run_cli("convert", "py:toy_models:small_cnn", "--scheme", "channel",
                   "--out", out).code == 0
    return out


@pytest.mark.parametrize("damage", ["truncated", "header", "bytes"])
def test_corrupt_model_dir_is_exit_2(toy_dir, damage, tmp_path, cli):
    weights = toy_dir / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "header":
        weights.write_bytes(b"\xff" * 16 + data[16:])
    else:  # same size, one tensor byte changed: only the SHA-256 can tell
        weights.write_bytes(data[:-5] + bytes([data[-5] ^ 0x55]) + data[-4:])
    dense = tmp_path / "dense.safetensors"
    result = cli("export", toy_dir, "--format", "dense", "--out", dense, "--trust-code")
    needle = "SHA-256" if damage == "bytes" else "corrupt or truncated"
    assert_clean_error(result, str(weights), needle)
    assert not dense.exists()
    assert list(tmp_path.iterdir()) == [toy_dir]


def test_not_a_model_dir_is_exit_2(tmp_path, cli):
    assert_clean_error(cli("export", tmp_path, "--format", "dense", "--out", tmp_path / "o"),
                       "not a symconvert model directory")


@pytest.mark.parametrize("name", ["bad.safetensors", "bad.pth"])
def test_corrupt_weights_file_is_exit_2(resnet18_weights, name, tmp_path, cli):
    root, _ = resnet18_weights
    good = root / ("r18.safetensors" if name.endswith("safetensors") else "r18.pth")
    bad = tmp_path / name
    bad.write_bytes(good.read_bytes()[:4096])
    out = tmp_path / "X"
    result = cli("convert", "torchvision:resnet18", "--scheme", "channel", "--weights", bad,
                 "--out", out)
    assert_clean_error(result, str(bad), "not a readable")
    assert not out.exists()


class _Payload:
    """Unpickling this would run a command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pth_whose_pickle_would_run_code_is_refused(tmp_path, cli):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": _Payload(marker)}, evil)
    out = tmp_path / "X"
    result = cli("convert", "torchvision:resnet18", "--scheme", "channel", "--weights", evil,
                 "--out", out)
    assert_clean_error(result, "refuses to unpickle", "GLOBAL")
    assert "weights_only` set to `False`" not in result.flat  # never advise running it
    assert not marker.exists(), "the pickle payload ran"
    assert not out.exists()


def test_unwritable_out_is_exit_2_before_any_work(tmp_path, cli):
    # CI runs as root, for whom chmod'ed directories are writable: a path under a regular
    # file fails for everyone
    blocker = tmp_path / "somefile"
    blocker.write_text("not a directory")
    result = cli("convert", "py:toy_models:small_cnn", "--scheme", "channel",
                 "--out", blocker / "sub")
    assert_clean_error(result, str(blocker), "is a file")
    assert blocker.read_text() == "not a directory"
    assert sorted(tmp_path.iterdir()) == [blocker]
    assert_clean_error(cli("convert", "py:toy_models:small_cnn", "--scheme", "channel",
                           "--out", blocker), "not a directory")


def test_out_holding_a_model_needs_overwrite(toy_dir, cli):
    before = (toy_dir / "model.safetensors").read_bytes()
    result = cli("convert", "py:toy_models:small_cnn", "--scheme", "spatial", "--out", toy_dir)
    assert_clean_error(result, "--overwrite")
    assert (toy_dir / "model.safetensors").read_bytes() == before
    result = cli("convert", "py:toy_models:small_cnn", "--scheme", "spatial", "--out", toy_dir,
                 "--overwrite")
    assert result.code == 0, result
    assert symconvert.read_metadata(toy_dir)["layers"]["stem.weight"]["scheme"] == "spatial"


# No network in CI: a closed local proxy makes that certain even where there is one, and
# an empty TORCH_HOME / HF_HOME makes sure no cached copy is found.
def _offline_env(tmp_path) -> dict[str, str]:
    dead = "http://127.0.0.1:9"
    return {"TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "1", "HTTPS_PROXY": dead, "HTTP_PROXY": dead,
            "https_proxy": dead, "http_proxy": dead, "NO_PROXY": "", "no_proxy": ""}


@pytest.mark.parametrize("model", ["torchvision:resnet18", "timm:resnet18"])
def test_offline_pretrained_names_the_cache_and_both_ways_out(model, tmp_path, cli_process):
    out = tmp_path / "X"
    result = cli_process("convert", model, "--scheme", "channel", "--out", out,
                         env=_offline_env(tmp_path))
    cache = tmp_path / ("torch/hub/checkpoints" if model.startswith("torchvision") else "hf/hub")
    assert_clean_error(result, "cannot fetch pretrained weights", str(cache), "--weights",
                       "--no-pretrained")
    assert not out.exists()


# --- help ----------------------------------------------------------------------------------


def test_python_m_symconvert_help(cli_process):
    result = cli_process("--help")
    assert result.code == 0, result
    for command in ("schemes", "inspect", "convert", "export"):
        assert command in result.stdout
    assert "symconvert convert" in result.stdout  # the typical use, as an example


def test_every_command_help_shows_examples(cli):
    from symconvert.cli import app as cli_module

    cli_module._register_commands()
    commands = [c.name or c.callback.__name__ for c in cli_module.app.registered_commands]
    assert {"schemes", "inspect", "convert", "export"} <= set(commands)
    for command in commands:
        result = cli(command, "--help")
        assert result.code == 0, result
        assert "Examples" in result.stdout, command
        assert f"symconvert {command} " in result.stdout, command


def test_schemes_lists_every_scheme(cli):
    result = cli("schemes", "--format", "json")
    assert result.code == 0, result
    listed = {s["name"].partition(":")[0]: s for s in json.loads(result.stdout)}
    assert {"channel", "spatial", "channel+spatial", "block", "quarter", "eighth", "flip",
            "repeat"} <= set(listed)
    assert listed["channel"]["paper_name"] == "tri / wwt"
    table = cli("schemes")
    assert table.code == 0 and "channel+spatial" in table.stdout


def test_inspect_without_scheme_summarises_every_scheme(cli, small_cnn):
    result = cli("inspect", "py:toy_models:small_cnn", "--format", "json")
    assert result.code == 0, result
    rows = {r["scheme"]: r for r in json.loads(result.stdout)}
    assert {"channel", "spatial", "block", "repeat:2"} <= set(rows)
    for spec in ("channel", "spatial", "block"):
        plan = symconvert.inspect(small_cnn, spec)
        assert (rows[spec]["converted"], rows[spec]["params_after"]) == (
            len(plan.converted), plan.total_after)


def test_export_into_the_model_directory_of_a_one_channel_model(tmp_path, cli):
    """The example input follows the model's real in_chans (1), not its pretrained config
    (3), and a file may be exported next to model.safetensors."""
    import torch

    import symconvert

    model = symconvert.create_model("timm:resnet_cifar_tiny", pretrained=False, in_chans=1)
    symconvert.convert(model, "channel")
    out = tmp_path / "tiny1"
    symconvert.save(model, out)
    result = cli("export", str(out), "--format", "torchscript", "--out", str(out / "model.pt"))
    assert result.code == 0, result.err
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = symconvert.load(out).eval()(x)
        got = torch.jit.load(str(out / "model.pt"))(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
