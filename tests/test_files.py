"""Outputs (issue 9): one atomic writer with the umask's mode, --out directories created
only for good inputs, removed on early failure, locked against a second writer; an output
equal to an input refused; OSErrors as exit 2 naming the path and the cause."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from conftest import assert_clean_error

import symconvert
from symconvert.io.files import LOCK_NAME, atomic_write_text, output_dir

MODEL = "timm:quickstart_digits"  # weights shipped with symconvert: offline


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    from symconvert.cli.app import main

    out = tmp_path_factory.mktemp("conv") / "qs"
    assert main(["convert", MODEL, "--scheme", "channel", "--out", str(out)]) == 0
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_get_the_umask_mode(umask022, tmp_path, cli):
    out = tmp_path / "m"
    assert cli("convert", MODEL, "--scheme", "channel", "--out", out).code == 0
    for name in ("model.safetensors", "symconvert.json", "plan.json"):
        assert _mode(out / name) == 0o644, name
    assert not (out / LOCK_NAME).exists()
    dense = tmp_path / "dense.safetensors"
    assert cli("export", out, "--format", "dense", "--out", dense).code == 0
    assert _mode(dense) == 0o644
    report = tmp_path / "r.json"
    assert cli("report", out, "--format", "json", "--out", report, "--no-progress",
               "--latency-runs", "1").code == 0
    assert _mode(report) == 0o644
    old = os.umask(0o077)
    try:
        assert _mode(atomic_write_text(tmp_path / "private.txt", "x")) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("args", [
    ["--subsample", "0"],
    ["--input-size", "abc"],
    ["--lr", "inf"],
    ["--lr", "nan"],
    ["--lr", "-1"],
    ["--warmup-epochs", "-3"],
    ["--checkpoint-every", "-1"],
    ["--weight-decay", "nan"],
    ["--resume"],
    ["--data", "imagefolder:{empty}"],
])
def test_finetune_bad_input_leaves_no_out_directory(args, converted, tmp_path, cli):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    out = tmp_path / "ft"
    args = [a.format(empty=empty) for a in args]
    data = [] if "--data" in args else ["--data", "digits"]
    result = cli("finetune", converted, *data, "--out", out, "--epochs", "1", *args)
    assert_clean_error(result)
    assert not out.exists()


def test_bad_convert_input_creates_nothing(tmp_path, cli):
    out = tmp_path / "a" / "b"
    assert_clean_error(cli("convert", MODEL, "--scheme", "channel", "--out", out,
                           "--target-reduction", "0.99"))
    assert not (tmp_path / "a").exists()


def test_interrupted_convert_leaves_no_partial_directory(tmp_path, cli, monkeypatch):
    import symconvert.io.checkpoint as checkpoint

    def interrupted(out, plan):
        raise KeyboardInterrupt  # Ctrl-C after model.safetensors and symconvert.json

    monkeypatch.setattr(checkpoint, "write_plan", interrupted)
    out = tmp_path / "m"
    result = cli("convert", MODEL, "--scheme", "channel", "--out", out)
    assert result.code == 130, result
    assert not out.exists()


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(converted, tmp_path, cli):
    out = tmp_path / "busy"
    with output_dir(out):  # another symconvert process writing there
        result = cli("convert", MODEL, "--scheme", "channel", "--out", out, "--overwrite")
        assert_clean_error(result, "being written by another symconvert process")
        result = cli("finetune", converted, "--data", "digits", "--out", out, "--epochs", "1",
                     "--subsample", "20")
        assert_clean_error(result, "being written by another symconvert process")
    assert list(out.iterdir()) == []  # nothing written by the refused runs, lock released


def test_a_concurrent_finetune_process_is_refused(converted, tmp_path, cli_process):
    import subprocess
    import sys

    out = tmp_path / "ft"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from symconvert.io.files import output_dir\n"
        f"with output_dir({str(out)!r}):\n"
        "    print('locked', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = cli_process("finetune", converted, "--data", "digits", "--out", out,
                             "--epochs", "1", "--subsample", "20")
        assert_clean_error(result, "being written by another symconvert process")
    finally:
        holder.kill()
        holder.wait()


def test_output_equal_to_input_is_refused(converted, tmp_path, cli):
    before = (converted / "model.safetensors").read_bytes()
    for out in (converted / "model.safetensors", converted / "symconvert.json", converted):
        result = cli("export", converted, "--format", "dense", "--out", out, "--overwrite")
        assert_clean_error(result, "input")
    assert (converted / "model.safetensors").read_bytes() == before
    assert_clean_error(cli("finetune", converted, "--data", "digits", "--out", converted,
                           "--overwrite", "--epochs", "1"), "input")
    assert_clean_error(cli("report", converted, "--out", converted / "model.safetensors",
                           "--no-progress"), "input")
    assert (converted / "model.safetensors").read_bytes() == before
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert_clean_error(cli("convert", MODEL, "--scheme", "channel", "--weights", weights,
                           "--out", weights), "input")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_os_errors_are_exit_2_naming_path_and_cause(code, tmp_path, cli, monkeypatch):
    import symconvert.io.checkpoint as checkpoint

    def failing(state, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint, "save_file", failing)
    out = tmp_path / "m"
    result = cli("convert", MODEL, "--scheme", "channel", "--out", out)
    assert_clean_error(result, str(out / "model.safetensors"), os.strerror(code))
    assert not out.exists()  # no partial directory, no temporary file


def test_full_disk_in_a_writer_without_errno_is_exit_2(tmp_path, cli, monkeypatch):
    import torch

    import symconvert.io.files as files

    monkeypatch.setattr(files, "_disk_full", lambda directory: True)

    def failing(obj, f, *a, **k):  # what torch.save says on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", failing)
    from symconvert.train.state import atomic_torch_save

    with pytest.raises(files.OutputError, match="No space left"):
        atomic_torch_save({"a": 1}, tmp_path / "ck.pt")
    assert list(tmp_path.iterdir()) == []


def test_report_checks_its_outputs_before_measuring(converted, tmp_path, cli, monkeypatch):
    import symconvert.report.build as report

    def never(*a, **k):
        raise AssertionError("measured before checking --out")

    monkeypatch.setattr(report, "build_report", never)
    import symconvert.io.files as files

    def readonly(directory, target):
        raise files.os_error(OSError(errno.EROFS, os.strerror(errno.EROFS)), target)

    monkeypatch.setattr(files, "probe_dir", readonly)
    for flag, name in (("--out", "r.json"), ("--plot", "r.png")):
        result = cli("report", converted, flag, tmp_path / name, "--no-progress")
        assert_clean_error(result, str(tmp_path / name), "Read-only file system")
    result = cli("report", converted, "--out", tmp_path / "no" / "such" / "r.json")
    assert_clean_error(result, "does not exist")


def test_os_error_anywhere_is_exit_2(tmp_path, cli, monkeypatch):
    import symconvert.io.export as export

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "x"))

    monkeypatch.setattr(export, "export", denied)
    model = symconvert.create_model(MODEL)
    model, _ = symconvert.convert(model, "channel")
    symconvert.save(model, tmp_path / "m")
    result = cli("export", tmp_path / "m", "--format", "dense", "--out", tmp_path / "d")
    assert_clean_error(result, str(tmp_path / "x"), "Permission denied")


def test_run_refuses_a_run_directory_in_use(tmp_path, cli):
    run_dir = tmp_path / "run"
    with output_dir(run_dir):
        result = cli("run", "quickstart", "--set", f"out={run_dir}", "--set",
                     "finetune.epochs=1")
        assert_clean_error(result, "being written by another symconvert process")
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]
