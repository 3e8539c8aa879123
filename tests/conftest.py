"""Shared fixtures: a CLI runner (in-process, and a real `python -m symconvert` process
where the process boundary matters), small models, and converted-model directories
shared by the tests that only read them."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Under pytest-xdist (`make test`: two workers on two cores) each worker and the processes it
# starts compute on one thread: two workers of two threads each oversubscribe the cores, and
# torch's spinning thread pools then slow small-op work (block-wise calibration's Adam steps)
# several-fold.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# toy_models.py is imported by `py:toy_models:...` MODEL strings, in-process and in
# subprocesses alike
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# rich wraps at 80 columns when stdout is not a terminal; wide output keeps layer names
# and one-paragraph errors on one line, so tests can read them
WIDTH = 400


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    # pytest-xdist (<= 3.8) sends `xdist_group` tests to one worker by tagging their id,
    # `item._nodeid = "...@group"`; pytest 9.2 keeps the id in `item._id` and ignores
    # `_nodeid`, so without this `--dist loadgroup` silently spread every group (each
    # worker rebuilt the shared resnet101 directory). Runs after xdist's hook.
    for item in items:
        tagged = item.__dict__.get("_nodeid")
        if tagged and tagged != item.nodeid and hasattr(item, "_id"):
            from _pytest.nodeid import coerce_node_id

            item._id = coerce_node_id(tagged)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def flat(self) -> str:
        """stdout + stderr with runs of whitespace collapsed (robust to wrapping)."""
        return re.sub(r"\s+", " ", self.output)

    def __str__(self) -> str:  # shown by pytest when an assertion on the result fails
        return f"exit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


@contextlib.contextmanager
def _environ(env: dict[str, str] | None):
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_cli(*args: str | os.PathLike, env: dict[str, str] | None = None) -> CliResult:
    """`symconvert ARGS` in this process: ``symconvert.cli.app.main`` with stdout/stderr
    captured and the exit code it returns."""
    from symconvert.cli import app as cli

    out, err = io.StringIO(), io.StringIO()
    widths = (cli.console.width, cli.err_console.width)
    cli.console.width = cli.err_console.width = WIDTH
    try:
        with _environ(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in args])
    finally:
        cli.console.width, cli.err_console.width = widths
    return CliResult(code, out.getvalue(), err.getvalue())


def run_process(
    *args: str | os.PathLike,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float = 240,
) -> CliResult:
    """`python -m symconvert ARGS` as a real process (fresh imports, real exit code)."""
    full_env = {**os.environ, "COLUMNS": str(WIDTH), **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(TESTS), str(REPO), full_env.get("PYTHONPATH", "")) if p
    )
    proc = subprocess.run(
        [sys.executable, "-m", "symconvert", *[str(a) for a in args]],
        capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def _find_shared() -> Path:
    """The real test data (``shared/data``) beside the checkout, or, in a clone of a local
    checkout (``git clone . /tmp/x``), beside the checkout it was cloned from;
    $SYMCONVERT_SHARED_DATA wins. Tests never download."""
    if os.environ.get("SYMCONVERT_SHARED_DATA"):
        return Path(os.environ["SYMCONVERT_SHARED_DATA"])
    here = REPO.parent / "shared/data"
    if here.is_dir():
        return here
    origin = subprocess.run(["git", "-C", str(REPO), "config", "--get", "remote.origin.url"],
                            capture_output=True, text=True).stdout.strip()
    if origin and Path(origin).is_dir():
        beside_origin = Path(origin).resolve().parent / "shared/data"
        if beside_origin.is_dir():
            return beside_origin
    return here


SHARED_DATA = _find_shared()
#: WikiText-2 (valid/test); $SYMCONVERT_WIKITEXT wins
WIKITEXT = Path(os.environ.get("SYMCONVERT_WIKITEXT") or SHARED_DATA / "wikitext-2")
#: CIFAR-10 as JPEG files (train: 1,000 per class; val: the 10,000 test images)
CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg"
#: real pretrained CIFAR-10 ResNets (He et al.), safetensors
PRETRAINED = SHARED_DATA / "pretrained"


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    """A slice of WikiText-2 as a ``text:ROOT`` corpus: the first 400 lines of its valid
    file as train.txt, the first 120 of its test file as test.txt."""
    assert WIKITEXT.is_dir(), f"WikiText-2 expected at {WIKITEXT} (shared/ beside the repo, or $SYMCONVERT_WIKITEXT)"
    root = tmp_path_factory.mktemp("wikitext-slice")
    valid = (WIKITEXT / "valid.txt").read_text(encoding="utf-8").splitlines()
    test = (WIKITEXT / "test.txt").read_text(encoding="utf-8").splitlines()
    (root / "train.txt").write_text("\n".join(valid[:400]) + "\n", encoding="utf-8")
    (root / "test.txt").write_text("\n".join(test[:120]) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def trusted_code():
    """For suites whose directories record `py:_helpers_train:...` sources (their own
    models): the test opts in as `--trust-code` would (symconvert/io/metadata.py). Use as
    ``pytestmark = pytest.mark.usefixtures("trusted_code")``."""
    from symconvert.io.metadata import trusting_code

    with trusting_code():
        yield


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a whole module (``pytest.mark.usefixtures("single_thread")``):
    faster on two shared cores, and the in-process runs compare with one-thread child
    processes (a different thread count sums in another order)."""
    from _helpers_train import one_thread

    with one_thread():
        yield


@pytest.fixture
def cli():
    """Run the CLI in-process: ``cli("convert", MODEL, "--scheme", "channel", ...)``."""
    return run_cli


@pytest.fixture
def cli_process():
    """Run the CLI as ``python -m symconvert`` in a subprocess."""
    return run_process


def assert_clean_error(result: CliResult, *needles: str) -> None:
    """Exit 2, a one-paragraph message naming what went wrong, no traceback."""
    assert result.code == 2, result
    assert "Traceback" not in result.output, result
    assert "internal error" not in result.output, result
    message = result.stderr.strip()
    assert message.startswith("error:"), result
    assert "\n\n" not in message, result  # one paragraph
    flat = re.sub(r"\s+", " ", message)
    for needle in needles:
        assert needle in flat, f"{needle!r} not in: {flat}"


@pytest.fixture
def small_cnn():
    """A tiny CNN with every conv flavour (built by toy_models, so `py:` can rebuild it)."""
    import symconvert

    return symconvert.create_model("py:toy_models:small_cnn", pretrained=False)


@pytest.fixture(scope="session")
def resnet101_channel_dir(tmp_path_factory):
    """`symconvert convert torchvision:resnet101 --scheme channel --no-pretrained --out X`,
    run once per test session (worker) and shared by the tests that only read X."""
    out = tmp_path_factory.mktemp("r101") / "X"
    result = run_cli("convert", "torchvision:resnet101", "--scheme", "channel",
                     "--no-pretrained", "--out", out)
    assert result.code == 0, result
    return out, result
