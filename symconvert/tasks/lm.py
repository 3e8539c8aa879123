"""Language models, the short way: the ``text:ROOT`` corpus and perplexity.

The corpus, the ``text`` data source and the language-model task live in
``symconvert.tasks.language_model``; training is the one loop of ``symconvert.train.loop``
(``finetune``/``fit``: resume, checkpoints, signals, torchrun, AMP, distillation).
This module keeps the names scripts use:

    corpus = load_corpus("text:data/ptb")
    model = symconvert.create_model("py:symconvert.models.lstm_lm:lstm_lm", pretrained=False,
                                    vocab_size=len(corpus.vocab))
    evaluate_lm(model, corpus, "test")   # {"perplexity": ..., "loss": ..., "tokens": ..., "split": "test"}

Training and saving (``train_lm``, ``save_lm``) are ``symconvert.train.lm``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from symconvert.checks import resolve_device
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


__all__ = ["EOS", "LAYOUT", "UNK", "Corpus", "batchify", "build_vocab", "check_vocab",
           "evaluate_lm", "load_corpus", "parse_text_spec", "read_tokens",
           "segments", "unigram_perplexity", "vocab_size_of"]
