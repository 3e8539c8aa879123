"""Language models, the short way (training and saving; the corpus and perplexity are
``symconvert.tasks.lm``):

    train_lm(model, corpus, "runs/lm", epochs=6)      # symconvert.train.loop.fit on the corpus
    save_lm(model, "lm-dense", corpus)                # a model directory with its vocabulary
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from symconvert.io.checkpoint import save
from symconvert.tasks.language_model import (
    Corpus,
    LanguageModelTask,
    check_vocab,
    corpus_loaders,
)
from symconvert.train.config import FinetuneConfig, task_config
from symconvert.train.loop import fit


def train_lm(model: nn.Module, corpus: Corpus, out: str | os.PathLike, epochs: int = 40, *,
             subsample: int | None = None, **config: Any) -> list[dict[str, Any]]:
    """Train ``model`` in place on the corpus's train split with ``symconvert.train.loop.fit``
    (checkpoints in ``out``; the language-model defaults: plain SGD, lr 20, clip 0.25, batch
    20, bptt 35). ``config`` takes ``FinetuneConfig`` fields; returns the metrics rows."""
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
    meta = {"lm": corpus.describe(), **(extra_metadata or {})}
    return save(model, out, source=source, extra_metadata=meta, overwrite=overwrite)


__all__ = ["save_lm", "train_lm"]
