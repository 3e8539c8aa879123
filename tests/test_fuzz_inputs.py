"""Fuzz of bad inputs (issue 9): every case exits 2 with a message, never a traceback or
"internal error", and leaves nothing half-written. A table of the kinds a 156-case fuzz
found mishandled, plus hypothesis over flag values and over crafted metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import symconvert
from symconvert.errors import CheckpointError
from symconvert.io.checkpoint import META_KEY, META_NAME, WEIGHTS_NAME, model_sha256

MODEL = "timm:quickstart_digits"


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
