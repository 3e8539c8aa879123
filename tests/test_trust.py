"""A model directory is data (issue 9, SPEC 5.4): opening one never runs code it names,
and its metadata is validated against a schema before anything is built."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error
from safetensors.torch import load_file, save_file

import symconvert
from symconvert.errors import CheckpointError
from symconvert.io.checkpoint import META_KEY, META_NAME, WEIGHTS_NAME, model_sha256


@pytest.fixture(scope="module")
def honest_dir(tmp_path_factory) -> Path:
    """timm:quickstart_digits (weights shipped in the package: offline) converted."""
    out = tmp_path_factory.mktemp("honest") / "qs"
    model = symconvert.create_model("timm:quickstart_digits")
    model, _ = symconvert.convert(model, "channel")
    symconvert.save(model, out)
    return out


def _rewrite(directory: Path, mutate, resign: bool = True) -> None:
    """Edit the metadata as an attacker would: header and symconvert.json alike, with the
    SHA-256 recomputed (it is a checksum, not a signature)."""
    weights = directory / WEIGHTS_NAME
    state = load_file(str(weights))
    meta = json.loads((directory / META_NAME).read_text())
    meta = mutate(meta) or meta
    if resign and isinstance(meta, dict):
        meta["sha256"] = model_sha256(state, meta)
    save_file(state, str(weights), metadata={META_KEY: json.dumps(meta)})
    (directory / META_NAME).write_text(json.dumps(meta))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --- the malicious directory ------------------------------------------------------------


@pytest.fixture
def malicious_dir(tmp_path) -> tuple[Path, Path]:
    """A directory whose metadata says: rebuild me with subprocess.getoutput('touch X')."""
    marker = tmp_path / "PWNED"
    model = symconvert.create_model("py:trust_models:bn_net", pretrained=False)
    model, _ = symconvert.convert(model, "channel", allow_empty=True)
    payload = {"library": "py", "name": "subprocess:getoutput", "num_classes": None,
               "kwargs": {"cmd": f"touch {marker}"}, "weights": None, "pretrained": False}
    symconvert.save(model, tmp_path / "evil", source=payload)
    assert json.loads((tmp_path / "evil" / META_NAME).read_text())["source"] == payload
    return tmp_path / "evil", marker


def test_api_load_never_runs_recorded_code(malicious_dir):
    directory, marker = malicious_dir
    with pytest.raises(CheckpointError) as info:
        symconvert.load(directory)
    message = str(info.value)
    assert "'subprocess'" in message and "'getoutput'" in message and "--trust-code" in message
    assert not marker.exists()
    symconvert.read_metadata(directory)  # reading the record runs nothing either
    assert not marker.exists()


@pytest.mark.parametrize("command", [
    ["evaluate", "{dir}", "--data", "digits"],
    ["report", "{dir}", "--no-progress"],
    ["report", "{dir}", "--data", "digits", "--subsample", "20", "--no-progress"],
    ["finetune", "{dir}", "--data", "digits", "--out", "{tmp}/ft", "--epochs", "1"],
    ["export", "{dir}", "--format", "dense", "--out", "{tmp}/dense.safetensors"],
    ["finetune", "{honest}", "--data", "digits", "--teacher", "{dir}", "--out", "{tmp}/ft2"],
])
def test_no_command_runs_recorded_code(command, malicious_dir, honest_dir, tmp_path, cli):
    directory, marker = malicious_dir
    args = [a.format(dir=directory, tmp=tmp_path, honest=honest_dir) for a in command]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli(*args)
    assert_clean_error(result, "'subprocess'", "'getoutput'", "--trust-code")
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no ft/, no export


def test_opt_in_loads_an_honest_py_directory(tmp_path, cli):
    torch.manual_seed(0)
    model = symconvert.create_model("py:trust_models:bn_net", pretrained=False)
    model, _ = symconvert.convert(model, "channel")
    symconvert.save(model, tmp_path / "honest")
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    loaded = symconvert.load(tmp_path / "honest", trust_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    from symconvert.io.metadata import trusting_code

    with trusting_code():  # what --trust-code does for a command
        symconvert.load(tmp_path / "honest")
    result = cli("export", tmp_path / "honest", "--format", "dense", "--out",
                 tmp_path / "d.safetensors", "--trust-code")
    assert result.code == 0, result
    assert_clean_error(cli("export", tmp_path / "honest", "--format", "dense", "--out",
                           tmp_path / "e.safetensors"), "trust_models", "--trust-code")


def test_symconvert_own_py_factories_need_no_opt_in(tmp_path):
    model = symconvert.create_model("py:symconvert.models.lstm_lm:lstm_lm_small",
                                    pretrained=False, vocab_size=50)
    model, _ = symconvert.convert(model, "channel")
    symconvert.save(model, tmp_path / "lm")
    symconvert.load(tmp_path / "lm")


# --- the schema ---------------------------------------------------------------------------


def _layer(meta):
    return next(iter(meta["layers"].values()))


CRAFTED = {
    "layers is a list": (lambda m: m.update(layers=list(m["layers"])), "layers"),
    "shape of strings": (lambda m: _layer(m).update(shape=["32", "32", "3", "3"]), "shape"),
    "groups 0": (lambda m: _layer(m).update(groups=0), "groups"),
    "groups not dividing": (lambda m: _layer(m).update(groups=5), "groups"),
    "1e5 x 1e5 shape": (lambda m: _layer(m).update(shape=[100_000, 100_000]), "elements"),
    "negative dimension": (lambda m: _layer(m).update(shape=[32, -32, 3, 3]), "shape"),
    "unknown scheme": (lambda m: _layer(m).update(scheme="rot13"), "unknown scheme"),
    "scheme that cannot hold the shape": (lambda m: _layer(m).update(scheme="spatial",
                                                                      shape=[32, 32]), "spatial"),
    "unknown library": (lambda m: m["source"].update(library="os"), "library"),
    "unregistered timm name": (lambda m: m["source"].update(name="not_a_model_xyz"),
                               "not a registered timm model"),
    "torchvision name not registered": (lambda m: m["source"].update(library="torchvision",
                                                                      name="os.system"),
                                        "torchvision"),
    "checkpoint_path kwarg": (lambda m: m["source"]["kwargs"].update(
        checkpoint_path="/etc/passwd"), "checkpoint_path"),
    "pretrained_cfg_overlay with file": (lambda m: m["source"]["kwargs"].update(
        pretrained_cfg_overlay={"file": "/etc/passwd"}), "pretrained_cfg_overlay"),
    "kwarg holding an object": (lambda m: m["source"]["kwargs"].update(act={"a": 1}),
                                "kwargs.act"),
    "num_classes a string": (lambda m: m["source"].update(num_classes="10"), "num_classes"),
    "format version 2": (lambda m: m.update(format_version=2), "format version"),
    "dtype not a float": (lambda m: m.update(dtype="object"), "dtype"),
    "metadata not an object": (lambda m: [m], "not an object"),
    "layer missing in the architecture": (
        lambda m: m["layers"].update({"nowhere.weight": dict(_layer(m))}), "nowhere.weight"),
    "recorded shape edited (re-signed)": (lambda m: _layer(m).update(shape=[32, 32, 5, 5]),
                                          "records shape"),
    "source builds a far larger model": (lambda m: m["source"].update(num_classes=5_000_000),
                                         "refusing to allocate"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_metadata_is_a_checkpoint_error(case, honest_dir, tmp_path, cli):
    mutate, needle = CRAFTED[case]
    directory = _copy(honest_dir, tmp_path / "d")
    _rewrite(directory, mutate)
    with pytest.raises(CheckpointError, match=None) as info:
        symconvert.load(directory)
    assert needle in str(info.value), str(info.value)
    out = tmp_path / "dense.safetensors"
    result = cli("export", directory, "--format", "dense", "--out", out)
    assert_clean_error(result)
    assert not out.exists()


def test_edited_shape_fails_the_sha256_that_now_covers_metadata(honest_dir, tmp_path, cli):
    directory = _copy(honest_dir, tmp_path / "d")
    _rewrite(directory, lambda m: _layer(m).update(shape=[32, 32, 5, 5]), resign=False)
    with pytest.raises(CheckpointError, match="SHA-256"):
        symconvert.load(directory)
    _rewrite(_copy(honest_dir, tmp_path / "e"),
             lambda m: m["source"].update(num_classes=11), resign=False)
    with pytest.raises(CheckpointError, match="SHA-256"):
        symconvert.load(tmp_path / "e")
    _rewrite(_copy(honest_dir, tmp_path / "f"), lambda m: m.update(sha256="zz"), resign=False)
    with pytest.raises(CheckpointError, match="sha256"):
        symconvert.load(tmp_path / "f")


def test_later_stages_may_add_their_own_keys(honest_dir, tmp_path):
    directory = _copy(honest_dir, tmp_path / "d")

    def extend(meta):
        meta["calibration"] = {"batches": 4, "data": "digits"}
        meta["finetune"] = {"args": {"lr": 0.1}}
        meta["parent"] = "/somewhere"
        meta["dtype"] = "bfloat16"
        _layer(meta)["output_error"] = 0.01
        _layer(meta)["tensor"] = "weight"

    _rewrite(directory, extend)
    loaded = symconvert.load(directory)
    assert loaded.symconvert_metadata["calibration"]["batches"] == 4
    assert math.isclose(_layer(loaded.symconvert_metadata)["output_error"], 0.01)
