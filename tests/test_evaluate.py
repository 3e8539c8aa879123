"""SPEC §2/§6 ``evaluate``: top-1/top-5 on the eval split, deterministic, JSON as documented."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _helpers_train import tiny_cnn
from conftest import assert_clean_error
from safetensors.torch import save_file

import symconvert
from symconvert.tasks.data import resolve_image_config
from symconvert.train.config import FinetuneConfig
from symconvert.train.evaluate import evaluate
from symconvert.train.loop import fit

# the directories here record `py:_helpers_train:...` sources (this suite's own models)
pytestmark = pytest.mark.usefixtures("trusted_code", "single_thread")


@pytest.fixture(scope="module")
def trained_mlp(tmp_path_factory):
    """tiny_mlp trained 2 epochs on digits (≈1 s), saved as a weights file."""
    torch.manual_seed(0)
    model = symconvert.create_model("py:_helpers_train:tiny_mlp", pretrained=False)
    tmp = tmp_path_factory.mktemp("mlp")
    fit(model, "digits", tmp / "run", FinetuneConfig(epochs=2, lr=0.1, batch_size=32,
                                                     distill=False), progress=False)
    model.eval()
    weights = tmp / "mlp.safetensors"
    save_file(model.state_dict(), str(weights))
    return model, weights


def test_matches_a_hand_computation_on_digits(trained_mlp):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    model, _ = trained_mlp
    result = evaluate(model, "digits", device="cpu")
    assert set(result) == {"top1", "top5", "n", "split"}
    assert (result["n"], result["split"]) == (360, "test")

    digits = load_digits()
    _, x, _, y = train_test_split(digits.images, digits.target, test_size=360,
                                  stratify=digits.target, random_state=0)
    config = resolve_image_config(model, native_size=(8, 8), native_chans=1)
    x = (torch.tensor(x / 16.0, dtype=torch.float32).unsqueeze(1) - config.mean[0]) / config.std[0]
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(5, dim=1).indices.numpy()
    assert result["top1"] == pytest.approx(float(np.mean(top5[:, 0] == y)), abs=1e-12)
    assert result["top5"] == pytest.approx(float(np.mean((top5 == y[:, None]).any(1))), abs=1e-12)
    assert result["top1"] > 0.85  # it did learn: the number measures something


def test_deterministic_eval_mode_and_mode_restored():
    torch.manual_seed(1)
    model = tiny_cnn()  # BatchNorm + Dropout: train mode would change both results and stats
    model.train()
    stats = model[1].running_mean.clone()
    a = evaluate(model, "digits", device="cpu", subsample=120)
    b = evaluate(model, "digits", device="cpu", subsample=120)
    assert a == b and a["n"] == 120
    assert model.training  # restored
    assert torch.equal(model[1].running_mean, stats)  # no BN update: eval mode, no_grad


def test_top5_only_with_five_or_more_classes(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 90, 10, 200)).save(tmp_path / split / c / f"{i}.png")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten())
    result = evaluate(model, f"imagefolder:{tmp_path}", device="cpu")
    assert set(result) == {"top1", "n", "split"}
    assert (result["n"], result["split"]) == (4, "val")


def test_tasks_are_registered_and_data_sources_name_them():
    """Metrics come from the data source's task: top-1/top-5 for images, perplexity for text."""
    from symconvert.tasks import TASKS, get_task, task_for_data
    from symconvert.tasks.data import DATA_SOURCES

    assert {"classification", "language-model"} <= set(TASKS)
    assert all(source.task in TASKS for source in DATA_SOURCES.values())
    assert task_for_data("digits").primary == "top1"
    assert task_for_data("text:/any/root") is get_task("language-model")
    assert task_for_data("text:/x").primary == "perplexity"


def test_cli_json_is_one_line_on_stdout(cli, trained_mlp, tmp_path):
    model, weights = trained_mlp
    source = symconvert.create_model("py:_helpers_train:tiny_mlp", weights=weights)
    converted, _ = symconvert.convert(source, "channel")
    symconvert.save(converted, tmp_path / "conv")

    result = cli("evaluate", tmp_path / "conv", "--data", "digits", "--format", "json",
                 "--device", "cpu")
    assert result.code == 0, result
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result  # nothing else on stdout
    payload = json.loads(lines[0])
    assert list(payload) == ["top1", "top5", "n", "split"]
    assert payload == evaluate(symconvert.load(tmp_path / "conv"), "digits", device="cpu")
    assert 0.0 <= payload["top1"] <= payload["top5"] <= 1.0

    # A MODEL string with a weights file: the unconverted source.
    result = cli("evaluate", "py:_helpers_train:tiny_mlp", "--weights", weights, "--data",
                 "digits", "--format", "json", "--subsample", "100")
    assert result.code == 0, result
    payload = json.loads(result.stdout)
    assert payload["n"] == 100
    assert payload == evaluate(model, "digits", subsample=100, device="cpu")


def test_cli_table(cli, trained_mlp):
    _, weights = trained_mlp
    result = cli("evaluate", "py:_helpers_train:tiny_mlp", "--weights", weights, "--data",
                 "digits")
    assert result.code == 0, result
    assert "top1" in result.stdout and "360" in result.stdout and "test" in result.stdout


def test_cli_class_mismatch_is_exit_2(cli, tmp_path):
    five = symconvert.create_model("py:_helpers_train:tiny_mlp", pretrained=False, num_classes=5)
    symconvert.save(five, tmp_path / "five")
    result = cli("evaluate", tmp_path / "five", "--data", "digits")
    assert_clean_error(result, "5 outputs", "10 classes", "--num-classes 10")


def test_cli_missing_data_root(cli, trained_mlp, tmp_path):
    _, weights = trained_mlp
    root = tmp_path / "no-such-cifar"
    result = cli("evaluate", "py:_helpers_train:tiny_mlp", "--weights", weights, "--data",
                 f"cifar10:{root}")
    assert_clean_error(result, str(root), "Expected layout")


def test_cli_missing_model_directory(cli, tmp_path):
    result = cli("evaluate", tmp_path / "not-here", "--data", "digits")
    assert_clean_error(result, str(tmp_path / "not-here"), "no such model directory")
