"""The inputs real users bring (issue 9): old BatchNorm checkpoints, usage errors,
numbers that make no sense, a diverging run, no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error
from safetensors.torch import save_file

import symconvert
from symconvert.errors import TrainingError

MODEL = "timm:quickstart_digits"


# --- --weights: pre-0.4.1 BatchNorm checkpoints --------------------------------------------


def _old_checkpoint(tmp_path: Path, suffix: str) -> tuple[Path, dict]:
    torch.manual_seed(0)
    state = symconvert.create_model("py:trust_models:bn_net", pretrained=False).state_dict()
    state = {k: v.clone() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["bn.running_mean"] += 0.5  # something to recognise after loading
    path = tmp_path / f"old{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_without_num_batches_tracked_converts(suffix, tmp_path, cli):
    path, state = _old_checkpoint(tmp_path, suffix)
    plain = symconvert.create_model("py:trust_models:bn_net", pretrained=False)
    plain.load_state_dict(state, strict=True)  # what PyTorch itself accepts
    model = symconvert.create_model("py:trust_models:bn_net", weights=path)
    torch.testing.assert_close(model.bn.running_mean, state["bn.running_mean"])
    assert int(model.bn.num_batches_tracked) == 0
    out = tmp_path / "conv"
    result = cli("convert", "py:trust_models:bn_net", "--weights", path, "--scheme", "channel",
                 "--out", out)
    assert result.code == 0, result
    loaded = symconvert.load(out, trust_code=True)
    torch.testing.assert_close(loaded.bn.running_mean, state["bn.running_mean"])


def test_real_mismatches_are_still_refused(tmp_path, cli):
    path, state = _old_checkpoint(tmp_path, ".safetensors")
    del state["bn2.running_var"]
    save_file(state, str(path))
    result = cli("convert", "py:trust_models:bn_net", "--weights", path, "--scheme", "channel",
                 "--out", tmp_path / "x")
    assert_clean_error(result, "1 missing keys (bn2.running_var)")
    assert not (tmp_path / "x").exists()


# --- usage errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["convert", MODEL, "--scheme", "channel", "--frobnicate"],
    ["convert", MODEL],
    ["finetune", "x", "--data", "digits", "--epochs", "abc"],
    ["frobnicate"],
    [],
    ["report"],
    ["export", "x", "--format"],
])
def test_usage_errors_exit_2_with_typer_usage(args, cli):
    result = cli(*args)
    assert result.code == 2, result
    assert "internal error" not in result.output and "Traceback" not in result.output
    # typer shows the usage line whenever the error knows its command
    assert "Usage:" in result.output or "requires an argument" in result.output, result


# --- finetune: numbers, divergence ------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("c") / "qs"
    model, _ = symconvert.convert(symconvert.create_model(MODEL), "channel")
    symconvert.save(model, out)
    return out


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--lr", "inf", "finite"), ("--lr", "nan", "finite"), ("--lr", "0", "greater than 0"),
    ("--warmup-epochs", "-3", "at least 0"), ("--checkpoint-every", "-1", "at least 0"),
    ("--weight-decay", "-1", "at least 0"), ("--clip-grad", "nan", "finite"),
    ("--decay-rate", "inf", "finite"), ("--distill-temperature", "0", "greater than 0"),
    ("--batch-size", "0", "at least 1"), ("--workers", "-2", "at least 0"),
    ("--decay-milestones", "a,b", "whole numbers"),
])
def test_finetune_numbers_are_checked_first(flag, value, needle, converted, tmp_path, cli):
    out = tmp_path / "ft"
    result = cli("finetune", converted, "--data", "digits", "--out", out, flag, value)
    assert_clean_error(result, flag, needle)
    assert not out.exists()
    from symconvert.train.run import finetune

    with pytest.raises(symconvert.SymconvertError):  # the API checks the same
        finetune(converted, "digits", out, **{flag[2:].replace("-", "_"): _number(value)})
    assert not out.exists()


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def test_diverging_run_writes_no_nan_and_keeps_the_last_good_checkpoint(tmp_path):
    from symconvert.train.config import FinetuneConfig
    from symconvert.train.loop import fit

    model = symconvert.create_model(MODEL)
    out = tmp_path / "run"

    def poison(epoch, step, loss):
        if step == 2:  # the update of step 2 diverged
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    cfg = FinetuneConfig(epochs=1, lr=0.01, batch_size=16, distill=False, subsample=64,
                         checkpoint_every=1)
    with pytest.raises(TrainingError, match="non-finite"):
        fit(model, "digits", out, cfg, progress=False, on_step=poison)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 1  # the last good one
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    with pytest.raises(TrainingError, match="non-finite"):
        symconvert.save(model, tmp_path / "never")
    assert not (tmp_path / "never" / "model.safetensors").exists()


def test_huge_lr_exits_2_and_writes_no_nan_model(converted, tmp_path, cli):
    out = tmp_path / "ft"
    result = cli("finetune", converted, "--data", "digits", "--out", out, "--lr", "1e38",
                 "--subsample", "40", "--batch-size", "40", "--epochs", "2", "--no-distill",
                 "--clip-grad", "0")
    assert result.code == 2, result  # after the epoch lines: the error paragraph
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert "error: " in result.stderr and "non-finite" in result.flat, result
    assert not (out / "model.safetensors").exists()
    if (out / "checkpoint.pt").exists():
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values()
                   if v.is_floating_point())


# --- offline -----------------------------------------------------------------------------------


def test_download_without_network_is_exit_2(tmp_path, cli, monkeypatch):
    import torchvision.datasets as tvd

    class Offline:
        def __init__(self, root, train=True, download=False):
            raise RuntimeError(
                "Error downloading train-images-idx3-ubyte.gz:\nTried "
                "https://ossci-datasets.s3.amazonaws.com/mnist/, got:\n<urlopen error "
                "[Errno -2] Name or service not known>\n")

    monkeypatch.setattr(tvd, "MNIST", Offline)
    result = cli("evaluate", MODEL, "--data", f"mnist:{tmp_path / 'mnist'}", "--download")
    assert_clean_error(result, "--download", "ossci-datasets", "drop --download")


def test_hf_hub_no_pretrained_offline_is_exit_2(cli_process):
    result = cli_process("inspect", "hf-hub:symconvert-tests/no-such-model", "--no-pretrained",
                         env={"HF_HUB_OFFLINE": "1"})
    assert_clean_error(result, "hf-hub:symconvert-tests/no-such-model", "config.json",
                       "timm:NAME")
