"""Fuzz of bad inputs (issues 9 and 22): every case exits 2 with a message, never a
traceback or "internal error", and leaves nothing half-written. A table of the kinds a
156-case fuzz found mishandled, hypothesis over flag values and over crafted metadata, and
(issue 22, a 228-case corpus) the kinds left: data of the wrong task, hostile images,
files that are not weights, non-finite tensors, signals, exact resume, tiny calibration
sets, empty paths."""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import shutil
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

import symconvert
from symconvert.errors import CheckpointError, SymconvertWarning
from symconvert.io.checkpoint import META_KEY, META_NAME, WEIGHTS_NAME, model_sha256
from symconvert.train.config import finetune_config
from symconvert.train.loop import TrainingInterrupted, fit
from symconvert.train.state import CHECKPOINT_NAME, METRICS_NAME, load_checkpoint

MODEL = "timm:quickstart_digits"


LM = "py:symconvert.models.lstm_lm:lstm_lm"
LM_KWARGS = {"vocab_size": 48, "emb": 8, "hidden": 8, "layers": 1, "dropout": 0.2}


def _png_claiming(width: int, height: int) -> bytes:
    """A 70-byte PNG whose header claims ``width`` × ``height`` grey pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


def _image_folder(root: Path, per_class: int, bomb: bool = False) -> Path:
    """imagefolder:ROOT with 8×8 grey images in two classes (and a 30000×30000 bomb)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class if split == "train" else 1):
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(
                    folder / f"{i}.png")
        if bomb:
            (root / split / "a" / "bomb.png").write_bytes(_png_claiming(30000, 30000))
    return root


def _corpus(root: Path) -> Path:
    """text:ROOT of 40 words in 60 seeded lines (about 800 tokens)."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice([f"w{i}" for i in range(40)]) for _ in range(12))
             for _ in range(60)]
    root.mkdir()
    (root / "train.txt").write_text("\n".join(lines[:50]) + "\n")
    (root / "test.txt").write_text("\n".join(lines[50:]) + "\n")
    return root


def _resigned(source: Path, target: Path, edit) -> Path:
    """A copy of the directory ``source`` with ``edit(state, meta)`` applied, re-signed (the
    SHA-256 matches: what an attacker, or a damaged training job, can write)."""
    shutil.copytree(source, target)
    state = load_file(str(target / WEIGHTS_NAME))
    meta = json.loads((target / META_NAME).read_text())
    edit(state, meta)
    meta["sha256"] = model_sha256(state, meta)
    save_file(state, str(target / WEIGHTS_NAME), metadata={META_KEY: json.dumps(meta)})
    (target / META_NAME).write_text(json.dumps(meta))
    return target


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    model, _ = symconvert.convert(symconvert.create_model(MODEL), "channel")
    symconvert.save(model, root / "conv")
    (root / "afile").write_text("x")
    (root / "garbage.safetensors").write_bytes(b"\0" * 100)
    (root / "garbage.pth").write_bytes(b"PK\x03\x04garbage")
    (root / "emptydir").mkdir()
    (root / "bad.yaml").write_text("model: [unclosed\n")
    # issue 22
    torch.manual_seed(0)
    lm, _ = symconvert.convert(symconvert.create_model(LM, pretrained=False, **LM_KWARGS),
                               "channel", layers=["rnn"])
    symconvert.save(lm, root / "lm")
    _corpus(root / "text")
    _image_folder(root / "bomb", 3, bomb=True)
    (root / "passwd.pth").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "random.bin").write_bytes(bytes(random.Random(1).randrange(1, 120)
                                            for _ in range(4096)))
    _resigned(root / "conv", root / "nan", lambda state, meta: state["stem.conv.weight"]
              .view(-1)[0].fill_(float("nan")))
    _resigned(root / "conv", root / "infvar", lambda state, meta: state["stem.bn.running_var"]
              .view(-1)[0].fill_(float("inf")))
    return root
def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _check(result, root: Path, before: set[str]) -> None:
    assert result.code == 2, result
    assert "Traceback" not in result.output, result
    assert "internal error" not in result.output, result
    left = _snapshot(root) - before
    assert not left, f"left behind: {sorted(left)}"


CV = ["convert", MODEL, "--scheme", "channel", "--out", "{r}/CV"]
FT = ["finetune", "{r}/conv", "--data", "digits", "--out", "{r}/FT", "--epochs", "1",
      "--subsample", "20", "--batch-size", "10"]
EV = ["evaluate", "{r}/conv", "--data", "digits", "--subsample", "20"]
RP = ["report", "{r}/conv", "--no-progress", "--latency-runs", "1"]

TABLE = [
    # usage errors (typer >= 0.29's own click exceptions)
    CV + ["--frobnicate"], ["convert", MODEL], FT + ["--epochs", "abc"], ["frobnicate"], [],
    # convert
    CV[:3] + ["repeat:abc", "--out", "{r}/CV"], CV + ["--target-reduction", "nan"],
    CV + ["--min-channels", "-5"], CV + ["--num-classes", "0"],
    CV + ["--num-classes", "99999999999"], CV + ["--format", "xml"],
    CV + ["--model-kwarg", "checkpoint_path=/etc/passwd"],
    CV + ["--model-kwarg", "pretrained_cfg_overlay={{file: /etc/passwd}}"],
    CV + ["--weights", "{r}/garbage.safetensors"], CV + ["--weights", "{r}/garbage.pth"],
    CV + ["--weights", "{r}/emptydir"], CV + ["--include", "re:["],
    ["convert", MODEL, "--scheme", "channel", "--out", "{r}/afile/sub"],
    # evaluate
    EV + ["--input-size", "100000"], EV + ["--input-size", "abc"], EV + ["--batch-size", "0"],
    EV + ["--data", "imagefolder:{r}/emptydir"], EV + ["--format", "xml"],
    # finetune
    FT + ["--lr", "inf"], FT + ["--lr", "1e400"], FT + ["--warmup-epochs", "-3"],
    FT + ["--checkpoint-every", "-1"], FT + ["--format", "xml"], FT + ["--resume"],
    FT + ["--subsample", "0"], FT + ["--input-size", "abc"], FT + ["--distill-alpha", "nan"],
    FT + ["--data", "imagefolder:{r}/emptydir"], FT + ["--teacher", "{r}/emptydir"],
    ["finetune", "{r}/conv", "--data", "digits", "--out", "{r}/afile/x"],
    # report / export / run / inspect / schemes
    RP + ["--out", "{r}/afile/x.json"], RP + ["--plot", "{r}/x.txt"], RP + ["--latency-runs", "0"],
    ["export", "{r}/conv", "--format", "dense", "--out", "{r}/conv/model.safetensors",
     "--overwrite"],
    ["export", "{r}/emptydir", "--format", "dense", "--out", "{r}/x"],
    ["run", "{r}/bad.yaml"], ["run", "quickstart", "--set", "finetune.lr=.inf",
                              "--set", "out={r}/RUN"],
    ["inspect", MODEL, "--min-channels", "-1"], ["inspect", MODEL, "--format", "xml"],
    ["schemes", "--format", "xml"],
]


@pytest.mark.parametrize("args", TABLE, ids=[" ".join(a[:1] + a[-2:]) for a in TABLE])
def test_bad_input_table(args, workdir):
    before = _snapshot(workdir)
    _check(run_cli(*[a.format(r=workdir) for a in args]), workdir, before)


# --- issue 22: the kinds a 228-case corpus still found -------------------------------------


def _clean_error(result, *needles: str) -> None:
    """``assert_clean_error`` for a command that may print progress or warnings first: exit
    2, no traceback, and its last line an ``error:`` paragraph naming ``needles``."""
    assert result.code == 2, result
    assert "Traceback" not in result.output and "internal error" not in result.output, result
    assert "error:" in result.stderr, result
    message = " ".join(result.stderr[result.stderr.rindex("error:"):].split())
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"


LMDIR = ["{r}/lm"]
KINDS = [
    # data of the wrong task: refused before any work, naming both sides and the way out
    (CV + ["--calibrate", "text:{r}/text"], ["--calibrate text:", "language-model data",
                                             "image classifier", "digits"]),
    (["inspect", MODEL, "--scheme", "channel", "--calibrate", "text:{r}/text"],
     ["--calibrate text:", "image classifier"]),
    (EV[:3] + ["text:{r}/text"], ["--data text:", "image classifier", "classification data"]),
    (FT[:3] + ["text:{r}/text"] + FT[4:], ["--data text:", "image classifier"]),
    (RP + ["--data", "text:{r}/text"], ["--data text:", "image classifier"]),
    (["convert", LM, "--no-pretrained", *[f"--model-kwarg={k}={v}" for k, v in LM_KWARGS.items()],
      "--scheme", "channel", "--layers", "rnn", "--out", "{r}/CV", "--calibrate", "digits"],
     ["--calibrate digits", "classification data", "is a language model", "text:ROOT"]),
    (["evaluate", "{r}/lm", "--data", "digits"], ["--data digits", "is a language model"]),
    (["finetune", "{r}/lm", "--data", "digits", "--out", "{r}/FT"], ["is a language model"]),
    # hostile images: PIL's decompression-bomb guard, named
    (CV + ["--calibrate", "imagefolder:{r}/bomb"], ["bomb.png", "too large to decode"]),
    (FT[:3] + ["imagefolder:{r}/bomb", "--num-classes", "2"] + FT[4:8],
     ["bomb.png", "too large to decode"]),
    (FT[:3] + ["imagefolder:{r}/bomb", "--num-classes", "2", "--workers", "1"] + FT[4:8],
     ["error: imagefolder: image", "bomb.png", "too large to decode"]),
    # files that are not weights
    (CV + ["--weights", "/dev/zero"], ["/dev/zero", "not a regular file"]),
    (CV + ["--weights", "{r}/passwd.pth"], ["passwd.pth", "not a weights file", "root:x"]),
    (CV + ["--weights", "{r}/random.bin"], ["random.bin", "not a weights file"]),
    # non-finite tensors are never written
    (["export", "{r}/nan", "--format", "dense", "--out", "{r}/x.safetensors"],
     ["stem.conv", "non-finite", "export"]),
    (["export", "{r}/infvar", "--format", "onnx", "--packed", "--out", "{r}/x.onnx"],
     ["stem.bn.running_var", "non-finite"]),
    (["export", "{r}/infvar", "--format", "dense", "--out", "{r}/x.safetensors"],
     ["stem.bn.running_var", "non-finite"]),
    # a learning rate that makes a language model diverge: the documented non-finite stop
    (["finetune", "{r}/lm", "--data", "text:{r}/text", "--out", "{r}/FT", "--lr", "1e30",
      "--epochs", "1", "--no-distill"], ["non-finite", "nothing is kept", "Lower --lr"]),
    # an empty path is not the current directory
    (CV[:-1] + [""], ["--out ''", "empty"]), (CV[:-2] + ["--out="], ["--out ''", "empty"]),
    (FT[:4] + ["--out", ""], ["--out ''"]),
    (["export", "{r}/conv", "--format", "dense", "--out", ""], ["--out ''"]),
]


@pytest.mark.parametrize(("args", "needles"), KINDS,
                         ids=[" ".join(a[:1] + a[-2:]) for a, _ in KINDS])
def test_issue22_kinds(args, needles, workdir, monkeypatch):
    monkeypatch.chdir(workdir)  # an empty --out would write here
    before = _snapshot(workdir)
    result = run_cli(*[a.format(r=workdir) for a in args])
    _check(result, workdir, before)
    _clean_error(result, *needles)
    assert "has no attribute" not in result.output and "beyond tensors" not in result.output


def test_a_crafted_alias_is_named(workdir, tmp_path):
    """A tied alias that is not a dotted tensor path, or names no tensor of the recorded
    shape: the message names it (not "CifarResNet has no attribute ``")."""
    def layer(meta):
        return meta["layers"][next(iter(meta["layers"]))]

    for alias, needle in (("stem.", "not a dotted module path"),
                          ("stem.conv.weight", "stem.conv.weight"),
                          ("nowhere.weight", "no such tensor")):
        directory = _resigned(workdir / "conv", tmp_path / alias.replace(".", "_"),
                              lambda state, meta, a=alias: layer(meta)["aliases"].append(a))
        with pytest.raises(CheckpointError) as info:
            symconvert.load(directory)
        assert needle in str(info.value) and "has no attribute" not in str(info.value)


def test_the_non_finite_stop_names_only_a_checkpoint_that_exists(workdir, tmp_path):
    out = tmp_path / "ft"
    result = run_cli("finetune", workdir / "conv", "--data", "digits", "--out", out,
                     "--lr", "1e38", "--clip-grad", "0", "--subsample", "40", "--batch-size",
                     "20", "--epochs", "2", "--no-distill", "--checkpoint-every", "1")
    _clean_error(result, "non-finite")
    if str(out / CHECKPOINT_NAME) in result.flat:
        assert (out / CHECKPOINT_NAME).is_file(), result
    else:
        assert "nothing is kept" in result.flat and not out.exists(), result


# --- run: what --dry-run refuses never creates the run directory ---------------------------


@pytest.mark.parametrize(("recipe", "needles"), [
    ({"data": "text:{r}/text"}, ["data: text:", "image classifier"]),
    ({"selection": {"calibrate": "text:{r}/text"}}, ["selection.calibrate: text:"]),
    ({"selection": {"target_reduction": 0.99}}, ["99.0%", "cannot be reached"]),
], ids=["text data", "text calibration", "unreachable target"])
def test_run_refuses_before_creating_its_directory(recipe, needles, workdir, tmp_path):
    data = {"model": MODEL, "scheme": "channel", "data": "digits", "out": str(tmp_path / "RUN"),
            **json.loads(json.dumps(recipe).replace("{r}", str(workdir)))}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(data))
    _clean_error(run_cli("run", path), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_run_that_fails_before_its_first_artifact_leaves_nothing(workdir, tmp_path):
    """The recipe validates (its calibration data is images), then calibration meets a
    hostile image: recipe.yaml and run.log, written first, go with the directory."""
    data = {"model": MODEL, "scheme": "channel", "data": "digits", "out": str(tmp_path / "RUN"),
            "selection": {"calibrate": f"imagefolder:{workdir / 'bomb'}"}}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(data))
    _clean_error(run_cli("run", path), "bomb.png", "too large to decode")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_finetune_onto_a_full_disk_leaves_nothing(workdir, tmp_path, monkeypatch):
    """metrics.jsonl is written, then the checkpoint meets ENOSPC: without a checkpoint to
    resume from, the partial output goes."""
    def full(obj, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "ft"
    result = run_cli(*[a.format(r=workdir) for a in FT[:4]], "--out", out, *FT[6:])
    _clean_error(result, "cannot write", "checkpoint.pt", "No space left on device")
    assert not out.exists()


# --- signals --------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_convert_writes_leaves_nothing(signum, workdir, tmp_path, monkeypatch):
    """SIGTERM is handled as Ctrl-C is: a message naming it, exit 143 (130), and no
    directory, no file, no .symconvert.lock left."""
    import symconvert.io.checkpoint as checkpoint

    real = checkpoint.save_file

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signum)  # arrives while model.safetensors is being written
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", signalled)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        result = run_cli("convert", MODEL, "--scheme", "channel", "--out", tmp_path / "a" / "b")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.code == 128 + signum, result
    assert signal.Signals(signum).name in result.stderr and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_finetune_then_resume_is_bit_exact(workdir, tmp_path, monkeypatch):
    """The CLI: SIGTERM during the third step → exit 143 naming it, a checkpoint; --resume
    → the same model.safetensors, every tensor and buffer, as an uninterrupted run."""
    from symconvert.train import loop

    real, calls = loop._Run.optimizer_step, []

    def step_then_signal(self, loss):
        real(self, loss)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    args = [str(workdir / "conv"), "--data", "digits", "--subsample", "64", "--batch-size",
            "16", "--epochs", "2", "--augment", "--no-distill"]
    with monkeypatch.context() as patch:
        patch.setattr(loop._Run, "optimizer_step", step_then_signal)
        stopped = run_cli("finetune", *args, "--out", tmp_path / "a")
    assert stopped.code == 143, stopped
    assert "stopped by SIGTERM at epoch 1, step 3" in stopped.flat, stopped
    assert "--resume" in stopped.flat
    assert run_cli("finetune", *args, "--out", tmp_path / "a", "--resume").code == 0
    assert run_cli("finetune", *args, "--out", tmp_path / "b").code == 0
    a = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    b = load_file(str(tmp_path / "b" / WEIGHTS_NAME))
    assert a.keys() == b.keys() and any(k.endswith("num_batches_tracked") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def _untimed(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "eval_time")
             and not k.endswith("_per_s")} for r in rows]


@pytest.mark.parametrize(("kind", "at", "stopped_at"), [
    ("images", (0, 2), (0, 2)), ("images", (0, 4), (0, 4)), ("text", (0, 3), (0, 3))],
    ids=["images mid-epoch", "images end of epoch", "text mid-epoch"])
def test_sigint_then_resume_is_bit_exact(kind, at, stopped_at, workdir, tmp_path):
    """SIGINT after step ``at``: the run stops at the next step boundary, before any of the
    next step ran (its forward would move BatchNorm statistics), so that the resumed run
    ends with every tensor and buffer of an uninterrupted run, bit for bit
    (``num_batches_tracked`` and running statistics included), and the same metrics."""
    if kind == "images":
        start = symconvert.load(workdir / "conv")
        data = "digits"
        config = finetune_config(data, epochs=2, batch_size=16, subsample=64, augment=True,
                                 distill=False, lr=0.05)
    else:
        start = symconvert.load(workdir / "lm")
        data = f"text:{workdir / 'text'}"
        config = finetune_config(data, epochs=2, batch_size=4, bptt=5, distill=False)

    def signal_at(epoch, step, loss):
        if (epoch, step) == at:
            os.kill(os.getpid(), signal.SIGINT)

    resumed, full = copy.deepcopy(start), copy.deepcopy(start)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT"):
        fit(copy.deepcopy(start), data, tmp_path / "a", config, progress=False,
            on_step=signal_at)
    ckpt = load_checkpoint(tmp_path / "a" / CHECKPOINT_NAME)
    assert (ckpt["epoch"], ckpt["step"]) == stopped_at
    fit(resumed, data, tmp_path / "a", config, resume=True, progress=False)
    fit(full, data, tmp_path / "b", config, progress=False)
    a, b = resumed.state_dict(), full.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert _untimed(tmp_path / "a") == _untimed(tmp_path / "b")


# --- tiny calibration sets ------------------------------------------------------------------


@pytest.mark.parametrize("images", [3, 12])
def test_a_tiny_calibration_set_calibrates_with_a_warning(images, tmp_path):
    data = _image_folder(tmp_path / "data", per_class=1 if images == 3 else 6)
    if images == 3:
        (data / "train" / "b" / "extra.png").write_bytes((data / "train" / "a" / "0.png")
                                                         .read_bytes())
    result = run_cli("convert", MODEL, "--scheme", "channel", "--out", tmp_path / "out",
                     "--calibrate", f"imagefolder:{data}")
    assert result.code == 0, result
    assert "warning:" in result.stderr and "over-fits" in result.flat
    meta = json.loads((tmp_path / "out" / META_NAME).read_text())
    assert meta["calibration"]["samples"] == images


def test_a_tiny_set_warns_through_the_api(tmp_path):
    data = _image_folder(tmp_path / "data", per_class=2)
    with pytest.warns(SymconvertWarning, match="only 4 items"):
        _, plan = symconvert.convert(symconvert.create_model(MODEL), "channel",
                                     calibrate=f"imagefolder:{data}")
    assert plan.calibration["samples"] == 4


# --- hypothesis: flag values -------------------------------------------------------------

_BAD_FLOATS = st.one_of(st.sampled_from([float("nan"), float("inf"), float("-inf")]),
                        st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False))
_FINETUNE_BAD = st.one_of(
    st.tuples(st.sampled_from(["--lr", "--distill-temperature", "--decay-rate"]),
              st.one_of(_BAD_FLOATS, st.just(0.0))),
    st.tuples(st.sampled_from(["--warmup-epochs", "--weight-decay", "--clip-grad"]),
              _BAD_FLOATS),
    st.tuples(st.sampled_from(["--checkpoint-every", "--workers", "--seed"]),
              st.integers(max_value=-1)),
    st.tuples(st.sampled_from(["--epochs", "--batch-size", "--subsample", "--num-classes"]),
              st.integers(max_value=0)),
    st.tuples(st.sampled_from(["--lr", "--epochs", "--batch-size", "--warmup-epochs"]),
              st.text(alphabet="abcxyz,;-", min_size=1, max_size=6)),
)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_FINETUNE_BAD)
def test_finetune_flag_values(workdir, flag_value):
    flag, value = flag_value
    before = _snapshot(workdir)
    args = [a.format(r=workdir) for a in FT] + [flag, str(value)]
    _check(run_cli(*args), workdir, before)


# --- hypothesis: crafted metadata --------------------------------------------------------

_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
              st.floats(allow_nan=False), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, prefix + (i,))


def _set(meta, path, value):
    if not path:
        return value
    target = meta
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return meta


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_crafted_metadata(workdir, tmp_path_factory, data):
    honest = json.loads((workdir / "conv" / META_NAME).read_text())
    paths = [p for p in _paths(honest) if not (p and p[0] == "versions")]
    path = data.draw(st.sampled_from(paths), label="path")
    value = data.draw(_JSON, label="value")
    meta = _set(json.loads(json.dumps(honest)), path, value)
    directory = tmp_path_factory.mktemp("crafted") / "d"
    shutil.copytree(workdir / "conv", directory)
    state = load_file(str(directory / WEIGHTS_NAME))
    if isinstance(meta, dict) and data.draw(st.booleans(), label="re-signed"):
        meta["sha256"] = model_sha256(state, meta)
    save_file(state, str(directory / WEIGHTS_NAME), metadata={META_KEY: json.dumps(meta)})
    try:
        model = symconvert.load(directory)
    except CheckpointError:
        return  # refused with a message: fine
    # accepted: then it is the honest model (the mutation touched nothing that matters)
    x = torch.zeros(1, 1, 8, 8)
    reference = symconvert.load(workdir / "conv").eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x))
