"""Language models, the short way: the ``text:ROOT`` corpus and perplexity.

The corpus, the ``text`` data source and the language-model task live in
``symconvert.tasks.language_model``; training is the one loop of ``symconvert.train.loop``
(``finetune``/``fit``: resume, checkpoints, signals, torchrun, AMP, distillation).
This module keeps the names scripts use:

    corpus = load_corpus("text:data/ptb")
    model = symconvert.create_model("py:symconvert.models.lstm_lm:lstm_lm", pretrained=False,
                                    vocab_size=len(corpus.vocab))
    train_lm(model, corpus, "runs/lm", epochs=6)      # symconvert.train.loop.fit on the corpus
    evaluate_lm(model, corpus, "test")   # {"perplexity": ..., "loss": ..., "tokens": ..., "split": "test"}
    save_lm(model, "lm-dense", corpus)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from symconvert.errors import DataError
from symconvert.tasks.language_model import (
    EOS,
    EVAL_BATCH,
    LAYOUT,
    UNK,
    Corpus,
    LanguageModelTask,
    SegmentLoader,
    batchify,
    build_vocab,
    check_vocab,
    corpus_loaders,
    load_corpus,
    parse_text_spec,
    read_tokens,
    segments,
    unigram_perplexity,
    vocab_size_of,
)


def evaluate_lm(model: nn.Module, corpus: Corpus, split: str | None = None, *,
                batch_size: int = EVAL_BATCH, bptt: int = 35,
                device: str | torch.device | None = None) -> dict[str, Any]:
    """``{"perplexity", "loss", "tokens", "n", "split"}`` on ``split`` (default: the corpus's
    eval split), measured as ``evaluate``/``report`` measure it (the language-model task)."""
    from symconvert.train.evaluate import resolve_device

    split = split or corpus.eval_split
    if split not in corpus.splits:
        raise DataError(f"the corpus at {corpus.root} has no {split!r} split "
                        f"(it has {', '.join(corpus.splits)}).")
    check_vocab(model, corpus)
    dev = resolve_device(device) if device is not None else None
    if dev is not None:
        model.to(dev)
    loaders = corpus_loaders(corpus, train=False)
    loaders.eval = SegmentLoader(batchify(corpus.splits[split], batch_size), bptt)
    loaders.eval_split = split
    return LanguageModelTask().evaluate(model, loaders, dev)


def train_lm(model: nn.Module, corpus: Corpus, out: str | os.PathLike, epochs: int = 40, *,
             subsample: int | None = None, **config: Any) -> list[dict[str, Any]]:
    """Train ``model`` in place on the corpus's train split with ``symconvert.train.loop.fit``
    (checkpoints in ``out``; the language-model defaults: plain SGD, lr 20, clip 0.25, batch
    20, bptt 35). ``config`` takes ``FinetuneConfig`` fields; returns the metrics rows."""
    from symconvert.train.config import FinetuneConfig, task_config
    from symconvert.train.loop import fit

    check_vocab(model, corpus)
    cfg = FinetuneConfig(**task_config(LanguageModelTask(), {"epochs": epochs, "distill": False,
                                                 **config}))
    loaders = corpus_loaders(corpus, batch_size=cfg.batch_size, bptt=cfg.bptt,
                             subsample=subsample)
    return fit(model, loaders, out, cfg, progress=False).metrics


def save_lm(model: nn.Module, out: str | os.PathLike, corpus: Corpus, *,
            source: dict | None = None, extra_metadata: dict | None = None,
            overwrite: bool = True) -> Path:
    """``symconvert.save`` plus the corpus description (vocabulary size, hash, files, cap)
    that ``text:`` loaders and ``check_vocab`` read back."""
    import symconvert

    meta = {"lm": corpus.describe(), **(extra_metadata or {})}
    return symconvert.save(model, out, source=source, extra_metadata=meta, overwrite=overwrite)


__all__ = ["EOS", "LAYOUT", "UNK", "Corpus", "batchify", "build_vocab", "check_vocab",
           "evaluate_lm", "load_corpus", "parse_text_spec", "read_tokens", "save_lm",
           "segments", "train_lm", "unigram_perplexity", "vocab_size_of"]
