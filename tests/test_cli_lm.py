"""SPEC section 6 `text:ROOT` through the CLI: a language model built with --model-kwarg,
converted with --layers rnn, fine-tuned by BPTT and evaluated by perplexity, on real text
(the first lines of WikiText-2's valid/test files)."""

from __future__ import annotations

import json

import pytest

from symconvert.cli.app import main


def _json(capsys) -> dict:
    out = capsys.readouterr().out.strip()
    return json.loads(out if out.startswith("{") and out.endswith("}") and "\n{" not in out
                      else out.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.xdist_group("lm-cli")
def test_text_data_finetune_and_evaluate_by_perplexity(tmp_path, corpus_root, capsys):
    from symconvert.tasks.lm import load_corpus

    vocab = len(load_corpus(f"text:{corpus_root}").vocab)
    out = tmp_path / "lm-channel"
    args = ["convert", "py:symconvert.models.lstm_lm:lstm_lm", "--no-pretrained",
            "--model-kwarg", f"vocab_size={vocab}", "--model-kwarg", "emb=32",
            "--model-kwarg", "hidden=32", "--model-kwarg", "layers=1",
            "--model-kwarg", "dropout=0", "--scheme", "channel", "--layers", "rnn",
            "--out", str(out), "--format", "json"]
    assert main(args) == 0
    plan = _json(capsys)
    assert [e["name"] for e in plan["layers"] if e["action"] == "convert"] == ["rnn.weight_hh_l0"]
    meta = json.loads((out / "symconvert.json").read_text())
    assert meta["source"]["kwargs"]["vocab_size"] == vocab  # recorded, so load() rebuilds it

    assert main(["evaluate", str(out), "--data", f"text:{corpus_root}", "--format", "json"]) == 0
    before = _json(capsys)
    assert main(["finetune", str(out), "--data", f"text:{corpus_root}", "--epochs", "2",
                 "--batch-size", "10", "--lr", "20", "--no-distill", "--device", "cpu",
                 "--format", "json"]) == 0
    tuned = _json(capsys)
    assert main(["evaluate", str(out / "finetuned"), "--data", f"text:{corpus_root}",
                 "--format", "json"]) == 0
    after = _json(capsys)
    print(f"\nperplexity on {after['tokens']} test tokens (vocab {vocab}): "
          f"untrained {before['perplexity']:.1f} -> fine-tuned {after['perplexity']:.1f}")
    assert after == {k: tuned[k] for k in after}  # evaluate agrees with finetune's report
    assert before["perplexity"] > 0.8 * vocab  # an untrained LM is close to uniform
    assert after["perplexity"] < 0.5 * before["perplexity"]  # it learned from real text


def test_model_kwarg_needs_key_value(capsys):
    assert main(["inspect", "py:symconvert.models.lstm_lm:lstm_lm", "--no-pretrained",
                 "--model-kwarg", "novalue", "--scheme", "channel"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
