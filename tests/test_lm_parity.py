"""Language models get what image classifiers get (SPEC §6, §7, issue 10), on real text
(slices of WikiText-2): exact resume after SIGKILL, torchrun, distillation, and a report
with the perplexity of the source, converted and fine-tuned models and `--compare dense`;
`symconvert run lstm-ptb` with a short budget reports all three."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from _helpers_train import (
    ddp_and_single,
    max_weight_diff,
    metrics,
    one_thread,
    start_cli,
    state_equal,
)
from safetensors.torch import load_file, save_file

import symconvert
from symconvert.tasks.lm import load_corpus
from symconvert.train.lm import train_lm
from symconvert.train.state import CHECKPOINT_NAME, load_checkpoint

LM = "py:symconvert.models.lstm_lm:lstm_lm"
SMALL = {"emb": 32, "hidden": 32, "layers": 1}
# the killed run is a one-thread child process: the in-process runs it is compared with use
# one thread too
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def vocab(corpus_root) -> int:
    return len(load_corpus(f"text:{corpus_root}").vocab)


@pytest.fixture(scope="module")
def dense_weights(corpus_root, vocab, tmp_path_factory) -> Path:
    """A dense LSTM LM trained one epoch on the slice, saved as a weights file (the
    'pretrained source' of the conversions below)."""
    work = tmp_path_factory.mktemp("dense")
    with one_thread():
        torch.manual_seed(0)
        model = symconvert.create_model(LM, pretrained=False, vocab_size=vocab, dropout=0.0,
                                        **SMALL)
        train_lm(model, load_corpus(f"text:{corpus_root}"), work / "run", epochs=2,
                 device="cpu")
    path = work / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _kwargs(vocab: int, dropout: float) -> list[str]:
    pairs = {"vocab_size": vocab, **SMALL, "dropout": dropout}
    return [a for k, v in pairs.items() for a in ("--model-kwarg", f"{k}={v}")]


def _convert(cli, out: Path, vocab: int, *, dropout: float = 0.0,
             weights: Path | None = None) -> Path:
    source = ["--weights", str(weights)] if weights else ["--no-pretrained"]
    result = cli("convert", LM, *source, *_kwargs(vocab, dropout), "--scheme", "channel",
                 "--layers", "rnn", "--out", out)
    assert result.code == 0, result
    return out


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "eval_time", "tokens_per_s")}
            for r in rows]


@pytest.mark.slow
@pytest.mark.xdist_group("lm-parity")
def test_text_finetune_resumes_bit_exactly_after_sigkill(cli, corpus_root, vocab, tmp_path):
    """SIGKILL `finetune --data text:` mid-epoch (dropout on, the hidden state carried
    across segments), rerun with --resume: the weights equal an uninterrupted run's."""
    conv = _convert(cli, tmp_path / "conv", vocab, dropout=0.2)

    def args(out: Path, *extra: str) -> list[str]:
        return ["finetune", str(conv), "--data", f"text:{corpus_root}", "--out", str(out),
                "--epochs", "2", "--checkpoint-every", "7", "--no-distill", "--device", "cpu",
                "--seed", "3", *extra]

    killed = start_cli(*args(tmp_path / "killed"))
    ckpt_path = tmp_path / "killed" / CHECKPOINT_NAME
    while not ckpt_path.exists():
        assert killed.poll() is None, killed.communicate()[1]
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL  # it really died mid-run
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["task"] == "language-model"
    if ckpt["step"]:  # mid-epoch: the hidden state to continue from is in the checkpoint
        assert ckpt["carry"]["student"] is not None
    per_epoch = ckpt["steps_per_epoch"]
    assert 0 < ckpt["epoch"] * per_epoch + ckpt["step"] < 2 * per_epoch
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    resumed = cli(*args(tmp_path / "killed", "--resume"))
    assert resumed.code == 0, resumed
    assert "resuming" in resumed.stderr
    full = cli(*args(tmp_path / "full"))
    assert full.code == 0, full
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert state_equal(a, b) == []  # bit-identical
    assert _untimed(metrics(tmp_path / "full")) == _untimed(metrics(tmp_path / "killed"))
    assert "eval_perplexity" in metrics(tmp_path / "full")[-1]


@pytest.mark.slow
@pytest.mark.xdist_group("lm-parity")
def test_text_report_has_three_perplexities_and_the_dense_control(cli, corpus_root, vocab,
                                                                   dense_weights, tmp_path):
    """A trained dense LM is converted, fine-tuned with distillation from it, and reported:
    source / converted / fine-tuned perplexity, and the dense control fine-tuned alike."""
    conv = _convert(cli, tmp_path / "conv", vocab, weights=dense_weights)
    tuned = cli("finetune", conv, "--data", f"text:{corpus_root}", "--epochs", "1",
                "--device", "cpu", "--format", "json")  # distillation on (the default)
    assert tuned.code == 0, tuned
    meta = symconvert.read_metadata(conv / "finetuned")
    assert meta["finetune"]["args"]["distill"] is True
    assert meta["finetune"]["args"]["teacher"] == "source"

    result = cli("report", conv / "finetuned", "--data", f"text:{corpus_root}",
                 "--compare", "dense", "--format", "json", "--latency-runs", "1",
                 "--device", "cpu")
    assert result.code == 0, result
    report = json.loads(result.stdout)
    acc = report["accuracy"]
    source, converted, finetuned = (acc[k]["perplexity"] for k in
                                    ("source", "converted", "finetuned"))
    print(f"\nperplexity on {acc['n']} tokens (vocab {vocab}): source {source:.1f}, converted "
          f"{converted:.1f}, fine-tuned {finetuned:.1f}, dense control "
          f"{report['compare']['dense']['perplexity']:.1f}")
    assert acc["split"] == "test" and acc["n"] > 1000
    assert finetuned == pytest.approx(meta["finetune"]["eval"]["perplexity"], rel=1e-6)  # fp32 noise
    assert source < 0.5 * vocab  # the source was trained
    assert finetuned < converted  # fine-tuning recovered some of what conversion cost
    dense = report["compare"]["dense"]
    assert dense["perplexity"] > 0 and dense["params_stored"] == report["params"]["before"]
    assert dense["before_finetune"]["perplexity"] == source
    assert "perplexity" in report["compare"]["summary"]
    table = cli("report", conv / "finetuned", "--data", f"text:{corpus_root}",
                "--latency-runs", "1", "--device", "cpu", "--plot", tmp_path / "report.png")
    assert table.code == 0 and "perplexity on the test split" in table.flat
    assert (tmp_path / "report.png").stat().st_size > 10_000  # curves and bars of perplexity


@pytest.mark.slow
@pytest.mark.xdist_group("lm-parity")
def test_text_torchrun_two_processes_match_one(cli, corpus_root, vocab, tmp_path):
    """torchrun --nproc-per-node 2 (gloo) with 5 streams per process vs one process with 10:
    rank r reads streams 5r..5r+4 of the same 10, so the updates agree to float noise."""
    conv = _convert(cli, tmp_path / "conv", vocab)
    common = ["--data", f"text:{corpus_root}", "--epochs", "2", "--device", "cpu",
              "--no-distill", "--lr", "5"]
    ddp_and_single(cli, ["finetune", conv, "--out", tmp_path / "ddp", "--batch-size", "5", *common],
                   ["finetune", conv, "--out", tmp_path / "single", "--batch-size", "10", *common])
    worst = max_weight_diff(tmp_path / "single", tmp_path / "ddp")
    print(f"\nLM DDP (2×5 streams, gloo) vs single (10): max |Δw| = {worst:.2e}")
    assert worst <= 1e-4
    ma, mb = metrics(tmp_path / "single"), metrics(tmp_path / "ddp")
    assert len(mb) == 2
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["eval_perplexity"] == pytest.approx(rb["eval_perplexity"], rel=1e-4)
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.xdist_group("lm-parity")
def test_run_lstm_ptb_on_a_short_wikitext_budget_reports_three_perplexities(
        cli, corpus_root, vocab, dense_weights, tmp_path):
    out = tmp_path / "run"
    sets = [f"data=text:{corpus_root}", f"model.weights={dense_weights}",
            "model.pretrained=false", f"model.kwargs.vocab_size={vocab}",
            "model.kwargs.emb=32", "model.kwargs.hidden=32", "model.kwargs.layers=1",
            "model.kwargs.dropout=0.0", "finetune.epochs=1", "finetune.device=cpu",
            "report.latency_runs=1", "report.plot=false", f"out={out}"]
    result = cli("run", "lstm-ptb", *[a for s in sets for a in ("--set", s)], "--no-progress")
    assert result.code == 0, result
    report = json.loads((out / "report.json").read_text())
    acc = report["accuracy"]
    ppl = {k: acc[k]["perplexity"] for k in ("source", "converted", "finetuned")}
    print(f"\nlstm-ptb on a WikiText-2 slice: {ppl}")
    assert all(v > 1 for v in ppl.values())
    assert ppl["finetuned"] < ppl["converted"]
    assert "perplexity" in (out / "report.md").read_text()
    assert [e["name"] for e in report["layers"]] == ["rnn.weight_hh_l0"]


def test_amp_on_the_cpu_for_an_lstm_is_a_clear_error(cli, corpus_root, vocab, tmp_path):
    """CPU bf16 autocast has no LSTM kernel in PyTorch: exit 2 with a way out, not a
    oneDNN traceback (AMP for language models runs on CUDA)."""
    from conftest import assert_clean_error

    conv = _convert(cli, tmp_path / "conv", vocab)
    result = cli("finetune", conv, "--data", f"text:{corpus_root}", "--amp", "--device", "cpu",
                 "--no-distill")
    assert_clean_error(result, "--amp on the CPU", "--no-amp")
