"""Plain progress lines when stderr is not a terminal (nohup, SLURM, CI): step, loss,
throughput and ETA every N steps, or every ~30 s (issue 10; timm's log_interval)."""

from __future__ import annotations

import re

import torch
from _helpers_train import one_thread, tiny_mlp

import symconvert.train.progress as train
from symconvert.tasks import get_task
from symconvert.tasks.language_model import corpus_loaders
from symconvert.tasks.lm import load_corpus
from symconvert.train.config import FinetuneConfig, task_config
from symconvert.train.loop import fit

LINE = re.compile(r"^epoch (\d+)/(\d+) step (\d+)/(\d+)  loss (\d+\.\d{4})  (\d+) (img|tok)/s  "
                  r"ETA \d+:\d\d:\d\d$")


def _lines(text: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


def test_a_line_every_n_steps_without_a_terminal(tmp_path, capsys):
    assert not train.err_console.is_terminal  # pytest captures stderr: no terminal
    with one_thread():
        torch.manual_seed(0)
        cfg = FinetuneConfig(epochs=1, batch_size=64, lr=0.05, distill=False, device="cpu",
                             log_interval=5)
        result = fit(tiny_mlp(), "digits", tmp_path, cfg, progress=True)
    lines = _lines(capsys.readouterr().err)
    steps = result.metrics[-1]["step"]  # one epoch: steps per epoch
    assert [int(m.group(3)) for m in lines] == list(range(5, steps + 1, 5))
    assert all(m.group(7) == "img" and int(m.group(4)) == steps for m in lines)
    assert float(lines[-1].group(5)) > 0 and result.metrics


def test_every_30_seconds_by_default_and_tokens_for_text(tmp_path, capsys, monkeypatch):
    root = tmp_path / "c"
    root.mkdir()
    (root / "train.txt").write_text("the cat sat on the mat\n" * 40)
    (root / "test.txt").write_text("the cat sat\n" * 5)
    monkeypatch.setattr(train, "LOG_SECONDS", 0.0)  # "due" at every step
    corpus = load_corpus(f"text:{root}")
    from symconvert.models.lstm_lm import lstm_lm

    with one_thread():
        torch.manual_seed(0)
        model = lstm_lm(vocab_size=len(corpus.vocab), emb=8, hidden=8, layers=1, dropout=0.0)
        cfg = FinetuneConfig(**task_config(get_task("language-model"),
                                                 {"epochs": 1, "distill": False,
                                                  "device": "cpu", "batch_size": 2, "bptt": 8}))
        fit(model, corpus_loaders(corpus, batch_size=2, bptt=8), tmp_path / "run", cfg,
            progress=True)
    lines = _lines(capsys.readouterr().err)
    assert lines and all(m.group(7) == "tok" for m in lines)
    assert [int(m.group(3)) for m in lines] == list(range(1, len(lines) + 1))


def test_no_plain_lines_when_progress_is_off(tmp_path, capsys):
    with one_thread():
        cfg = FinetuneConfig(epochs=1, batch_size=128, distill=False, device="cpu",
                             log_interval=1)
        fit(tiny_mlp(), "digits", tmp_path, cfg, progress=False)
    assert _lines(capsys.readouterr().err) == []
