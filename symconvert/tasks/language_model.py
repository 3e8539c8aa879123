"""Language modelling: the ``text:ROOT`` corpus, BPTT segments, perplexity.

The paper's language-model setting (its code builds on PyTorch's
``examples/word_language_model``), as a ``Task`` the shared training loop runs:

* ``text:ROOT``: ``ROOT/train.txt``, ``valid.txt``, ``test.txt`` in PTB format — whitespace
  tokens, one sentence or paragraph per line, ``<eos>`` appended to every line. The
  vocabulary comes from the whole training text (capped to the model's embedding rows, or
  to what the model directory records); words it lacks become ``<unk>``.
* Training (``symconvert.train.loop.fit``): truncated BPTT over ``batch_size`` parallel streams
  per process (``batchify``; under torchrun rank r reads streams r·B … (r+1)·B-1 of
  ``B × world`` streams, so a 2-process run sees the batches of a 1-process run with
  ``2B``), the hidden state carried across segments, detached, and checkpointed with the
  run, so resume is exact. Defaults are the paper's: plain SGD, lr 20, clip 0.25, bptt 35,
  batch 20. ``--subsample N`` caps every split at N tokens (short budgets).
* Evaluation: perplexity = exp(mean negative log-likelihood per predicted token) over 10
  streams read in order (the paper's eval batch), whatever the caller's batch size.

A model fits when ``model(tokens[T, B], hidden) -> (logits[T, B, V], hidden)`` with
``hidden=None`` meaning a zero state — ``symconvert.models.lstm_lm`` does.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from symconvert.errors import DataError
from symconvert.models.hf import is_hf
from symconvert.tasks.base import Metric, StepOutput, Task, register_task
from symconvert.tasks.data import DataSource, DataSpec, LoaderOptions, Loaders, register_data_source
from symconvert.tasks.hf_text import hf_text_loaders

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
LAYOUT = "ROOT/train.txt, ROOT/valid.txt and/or ROOT/test.txt (PTB format: whitespace tokens, one line per sentence)"


# ----------------------------------------------------------------------------- corpus


def read_tokens(path: str | os.PathLike, max_tokens: int | None = None) -> list[str]:
    """The words of a PTB-format file, ``<eos>`` after every line (blank lines too, as the
    reference implementation does). ``max_tokens`` stops reading early (short budgets)."""
    path = Path(path)
    tokens: list[str] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                tokens.extend(line.split())
                tokens.append(EOS)
                if max_tokens is not None and len(tokens) >= max_tokens:
                    return tokens[:max_tokens]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); expected "
                        f"{LAYOUT}.") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}; expected {LAYOUT}.") from None
    return tokens


def build_vocab(tokens: list[str], max_vocab: int | None = None) -> list[str]:
    """Index → word: the training words by falling frequency (ties: first occurrence), with
    ``<unk>`` and ``<eos>`` always present. ``max_vocab`` keeps the most frequent words."""
    counts = Counter(tokens)
    first: dict[str, int] = {}
    for i, word in enumerate(tokens):
        first.setdefault(word, i)
    words = sorted(counts, key=lambda w: (-counts[w], first[w]))
    specials = (EOS, UNK)
    if max_vocab is not None:
        if max_vocab < len(specials):
            raise DataError(f"max_vocab must be at least 2 (for {EOS} and {UNK}), got {max_vocab}")
        kept = {w for w in words if w not in specials}
        kept = set([w for w in words if w in kept][: max_vocab - len(specials)])
        words = [w for w in words if w in kept or w in specials]
    words += [s for s in specials if s not in words]
    return words


@dataclass
class Corpus:
    """Token-id streams of the splits present, and the vocabulary (from the train split)."""

    vocab: list[str]
    splits: dict[str, torch.Tensor]
    root: Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    max_vocab: int | None = None
    max_tokens: int | dict[str, int] | None = None

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @property
    def unk(self) -> int:
        return self.index[UNK]

    @property
    def eval_split(self) -> str:
        """Where reported perplexity is measured: ``test`` when present, else ``valid``."""
        return "test" if "test" in self.splits else "valid"

    def vocab_sha256(self) -> str:
        return hashlib.sha256("\n".join(self.vocab).encode()).hexdigest()

    def encode(self, tokens: list[str]) -> torch.Tensor:
        unk = self.unk
        return torch.tensor([self.index.get(w, unk) for w in tokens], dtype=torch.long)

    def describe(self) -> dict[str, Any]:
        """What rebuilds this corpus (recorded next to a model trained on it)."""
        return {
            "root": str(self.root) if self.root else None,
            "files": dict(self.files),
            "max_vocab": self.max_vocab,
            "max_tokens": self.max_tokens,
            "vocab_size": len(self.vocab),
            "vocab_sha256": self.vocab_sha256(),
            "tokens": {k: int(v.numel()) for k, v in self.splits.items()},
        }


def parse_text_spec(spec: str | os.PathLike) -> Path:
    """``text:ROOT`` (or a bare folder) → ROOT."""
    text = str(spec).strip()
    if text.startswith("text:"):
        text = text[len("text:"):]
    elif ":" in text.split("/", 1)[0]:
        raise DataError(f"--data {spec!r} is not a text corpus; use text:ROOT with {LAYOUT}.")
    if not text:
        raise DataError(f"--data text: needs a folder: text:ROOT with {LAYOUT}.")
    return Path(text).expanduser()


def load_corpus(
    spec: str | os.PathLike,
    *,
    max_vocab: int | None = None,
    max_tokens: int | dict[str, int] | None = None,
    train: str = "train.txt",
    valid: str | None = "valid.txt",
    test: str | None = "test.txt",
) -> Corpus:
    """Read ``text:ROOT``: ``train`` is required, ``valid``/``test`` are used when present
    (at least one of them must be). ``train``/``valid``/``test`` name the files inside ROOT
    (e.g. WikiText-2's ``valid.txt`` as training text: ``train="valid.txt", valid=None``).
    ``max_tokens`` truncates every split (or, as a dict, the splits it names)."""
    root = parse_text_spec(spec)
    if not root.is_dir():
        raise DataError(f"text corpus folder {root} does not exist; expected {LAYOUT}.")
    names = {"train": train, "valid": valid, "test": test}
    files = {split: name for split, name in names.items() if name and (root / name).is_file()}
    if "train" not in files:
        raise DataError(f"{root / train} not found: a text corpus needs a training file "
                        f"({LAYOUT}); the vocabulary is built from it.")
    if len(files) < 2:
        raise DataError(f"{root} has {train} but neither {valid} nor {test}: a text corpus needs "
                        f"an evaluation split ({LAYOUT}).")
    caps = max_tokens if isinstance(max_tokens, dict) else dict.fromkeys(SPLITS, max_tokens)
    tokens = {split: read_tokens(root / name, caps.get(split)) for split, name in files.items()}
    for split, toks in tokens.items():
        if len(toks) <= sum(t == EOS for t in toks):  # nothing but line ends
            raise DataError(f"{root / files[split]} holds no words; expected {LAYOUT}.")
    vocab = build_vocab(tokens["train"], max_vocab)
    corpus = Corpus(vocab=vocab, splits={}, root=root, files=files, max_vocab=max_vocab,
                    max_tokens=max_tokens)
    corpus.splits = {split: corpus.encode(toks) for split, toks in tokens.items()}
    return corpus


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A token stream → ``[T, batch_size]``: ``batch_size`` contiguous streams side by side
    (the tail that does not fill a column is dropped)."""
    steps = data.numel() // batch_size
    if steps < 2:
        raise DataError(f"{data.numel()} tokens cannot fill {batch_size} streams of at least 2 "
                        "tokens; use a smaller batch size or more text.")
    return data[: steps * batch_size].view(batch_size, steps).t().contiguous()


def segments(source: torch.Tensor, bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input[t:t+L], target[t+1:t+1+L]) segments of a batchified stream."""
    for start in range(0, source.size(0) - 1, bptt):
        length = min(bptt, source.size(0) - 1 - start)
        yield source[start : start + length], source[start + 1 : start + 1 + length]


# ----------------------------------------------------------------------------- model glue


def _detach(hidden: Any) -> Any:
    if hidden is None:
        return None
    if isinstance(hidden, torch.Tensor):
        return hidden.detach()
    return type(hidden)(_detach(h) for h in hidden)


def vocab_size_of(model: nn.Module) -> int | None:
    """The vocabulary a language model was built for (its first embedding's rows)."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module.num_embeddings
    return None


def check_vocab(model: nn.Module, corpus: Corpus, exact: bool = True) -> None:
    """The corpus's word ids must be the model's: same size (``exact``) or at most the
    model's rows, and the recorded vocabulary hash when the model has one."""
    size = vocab_size_of(model)
    if size is not None and (size != len(corpus.vocab) if exact else size < len(corpus.vocab)):
        raise DataError(
            f"the model's vocabulary has {size} words but the corpus ({corpus.root}) gives "
            f"{len(corpus.vocab)}: build the model with vocab_size={len(corpus.vocab)}, or read "
            "the corpus with the max_vocab / files the model was trained with.")
    recorded = (getattr(model, "symconvert_metadata", None) or {}).get("lm", {})
    if recorded.get("vocab_sha256") and recorded["vocab_sha256"] != corpus.vocab_sha256():
        raise DataError(
            f"the corpus at {corpus.root} gives another vocabulary than the one the model was "
            f"trained with (recorded: {recorded.get('root')}, files {recorded.get('files')}, "
            f"max_vocab {recorded.get('max_vocab')}); word ids would not match.")



def unigram_perplexity(corpus: Corpus, split: str | None = None) -> float:
    """Perplexity on ``split`` of the add-one-smoothed unigram model of the train split,
    over the same vocabulary: the baseline a language model must beat by far."""
    split = split or corpus.eval_split
    size = len(corpus.vocab)
    counts = torch.bincount(corpus.splits["train"], minlength=size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(float(-logp[corpus.splits[split]].mean()))


# ----------------------------------------------------------------------------- loaders

EVAL_BATCH = 10  # streams of the eval split (the paper's); fixed so every tool agrees


class SegmentLoader:
    """The ``(input, target)`` BPTT segments of a batchified stream, in order; ``set_epoch``
    positions it (``start``: segments to skip, for resume). ``len`` is segments per epoch."""

    def __init__(self, source: torch.Tensor, bptt: int) -> None:
        if bptt < 1:
            raise DataError(f"bptt must be at least 1, got {bptt}")
        self.source, self.bptt, self.start = source, bptt, 0

    def __len__(self) -> int:
        return math.ceil((self.source.size(0) - 1) / self.bptt)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.start = start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, segment in enumerate(segments(self.source, self.bptt)):
            if i >= self.start:
                yield segment


def corpus_loaders(corpus: Corpus, *, batch_size: int = 20, bptt: int = 35,
                   subsample: int | None = None, rank: int = 0, world_size: int = 1,
                   train: bool = True, spec: DataSpec | None = None) -> Loaders:
    """Loaders over a ``Corpus``: this rank's train streams and the whole eval split."""
    cap = (lambda t: t[:subsample]) if subsample else (lambda t: t)
    split = corpus.eval_split
    train_loader = None
    if train:
        streams = batchify(cap(corpus.splits["train"]), batch_size * world_size)
        mine = streams[:, rank * batch_size:(rank + 1) * batch_size].contiguous()
        train_loader = SegmentLoader(mine, bptt)
    eval_stream = cap(corpus.splits[split])
    spec = spec or DataSpec(name="text", root=corpus.root, text=f"text:{corpus.root}")
    return Loaders(spec=spec, train=train_loader, eval=SegmentLoader(batchify(eval_stream, EVAL_BATCH), bptt),
                   num_classes=len(corpus.vocab), eval_split=split, task=LanguageModelTask.name,
                   n_train=int(cap(corpus.splits["train"]).numel()), n_eval=int(eval_stream.numel()),
                   meta={"corpus": corpus, "record": {"lm": corpus.describe()}})


def recorded_corpus_options(model: nn.Module | None) -> dict[str, Any]:
    """How to read the corpus so word ids match ``model``: the files and vocabulary cap its
    directory records, else the cap its embedding implies."""
    recorded = (getattr(model, "symconvert_metadata", None) or {}).get("lm", {}) if model else {}
    options: dict[str, Any] = {}
    names = recorded.get("files")
    if names:  # recorded files list only the splits that were present: the others stay unread
        options.update(train=names.get("train") or "train.txt", valid=names.get("valid"),
                       test=names.get("test"))
    if recorded.get("max_tokens") is not None:  # the caps the vocabulary was built under
        options["max_tokens"] = recorded["max_tokens"]
    if recorded.get("max_vocab") is not None:
        options["max_vocab"] = recorded["max_vocab"]
    elif model is not None and vocab_size_of(model) is not None:
        options["max_vocab"] = vocab_size_of(model)
    return options


@register_data_source
class TextSource(DataSource):
    name = "text"
    task = "language-model"
    layout = LAYOUT
    example = "text:data/ptb"

    def loaders(self, spec: DataSpec, model: nn.Module | None, options: LoaderOptions) -> Loaders:
        if model is not None and is_hf(model):  # a transformers model: its tokenizer, its task
            return hf_text_loaders(spec, model, options)
        corpus = load_corpus(spec.root, **recorded_corpus_options(model))
        return corpus_loaders(corpus, batch_size=options.batch_size, bptt=options.bptt,
                              subsample=options.subsample, rank=options.rank,
                              world_size=options.world_size, train=options.train, spec=spec)


# ----------------------------------------------------------------------------- the task


def _to(hidden: Any, device: torch.device) -> Any:
    if hidden is None:
        return None
    if isinstance(hidden, torch.Tensor):
        return hidden.detach().to(device)
    return tuple(_to(h, device) for h in hidden)


@register_task
class LanguageModelTask(Task):
    name = "language-model"
    # The paper's: plain SGD (no momentum, no weight decay), lr 20, gradient norm 0.25.
    defaults = {"lr": 20.0, "clip_grad": 0.25, "batch_size": 20, "momentum": 0.0,
                "weight_decay": 0.0, "warmup_epochs": 0.0}
    unit = "tok"
    items = "tokens"
    score_metrics = (Metric("perplexity", "perplexity", higher_is_better=False),)
    score_title = "perplexity"
    output_names = ("output", "hidden")
    #: the token sequence length of an example input (the BPTT segment)
    sequence = 35
    cpu_amp_unsupported = ("PyTorch's CPU autocast cannot run nn.LSTM/GRU (oneDNN has no "
                           "primitive for it under bf16 autocast)")
    model_kind = "a language model"

    def refuses(self, model: nn.Module, meta: dict[str, Any] | None = None) -> Task | None:
        """A model with a token embedding reads token ids (a ``py:`` language model need
        not say it is one); any other takes text only if it claims this task."""
        return None if vocab_size_of(model) is not None else super().refuses(model, meta)

    def step(self, model: nn.Module, teacher: nn.Module | None, batch: Any,
             device: torch.device, config: Any, carry: Any) -> tuple[StepOutput, Any]:
        inputs, targets = (t.to(device, non_blocking=True) for t in batch)
        carry = carry or {}
        logits, hidden = model(inputs, _to(carry.get("student"), device))
        soft, t_hidden = None, None
        if teacher is not None:
            with torch.no_grad():
                soft, t_hidden = teacher(inputs, _to(carry.get("teacher"), device))
        loss = self.mixed_loss(logits, targets, soft, config)
        return StepOutput(loss=loss, seen=targets.numel()), {"student": _to(hidden, device),
                                                             "teacher": _to(t_hidden, device)}

    def claims(self, model: nn.Module, meta: dict[str, Any]) -> bool:
        return bool(getattr(model, "is_language_model", False) or meta.get("lm"))

    def same_data(self, model: nn.Module, meta: dict[str, Any]) -> nn.Module:
        """The recorded text files and vocabulary (``lm``), so that word ids and the
        evaluation text are the same."""
        own = getattr(model, "symconvert_metadata", None) or {}
        if meta.get("lm") and not own.get("lm"):
            model.symconvert_metadata = {**own, "lm": meta["lm"]}
        return model

    def describe_n(self, n: int | None) -> str:
        return f"{'—' if n is None else f'{n:,}'} tokens"

    def example_inputs(self, model: nn.Module, batch_size: int = 1,
                       input_size: Any = None) -> tuple[torch.Tensor, ...]:
        """Token ids ``[sequence, batch]`` (the model starts from a zero hidden state)."""
        return (torch.zeros(self.sequence, batch_size, dtype=torch.long),)

    def dynamic_axes(self, model: nn.Module, example: tuple[torch.Tensor, ...]
                     ) -> tuple[list[str], dict[str, dict[int, str]]]:
        """``output`` [T, B, V] and the final state: ``hidden`` (and ``cell`` for an LSTM)."""
        with torch.no_grad():
            _, hidden = model(*example)
        names = ["output", "hidden", "cell"] if isinstance(hidden, tuple) else ["output", "hidden"]
        axes: dict[str, dict[int, str]] = {"input": {0: "time", 1: "batch"},
                                           "output": {0: "time", 1: "batch"}}
        for name in names[1:]:
            axes[name] = {1: "batch"}
        return names, axes

    def check_model(self, model: nn.Module, loaders: Loaders) -> None:
        check_vocab(model, loaders.meta["corpus"], exact=False)

    @torch.no_grad()
    def metrics(self, model: nn.Module, loaders: Loaders, device: torch.device,
                autocast: contextlib.AbstractContextManager | None = None) -> dict[str, Any]:
        """Every rank reads the whole eval split (it is small and the result is then the
        same everywhere, with no reduction)."""
        self.check_model(model, loaders)
        total = torch.zeros((), dtype=torch.float64, device=device)
        count, hidden = 0, None
        loaders.eval.set_epoch(0)
        for inputs, targets in loaders.eval:
            inputs, targets = inputs.to(device), targets.to(device)
            with autocast or contextlib.nullcontext():
                logits, hidden = model(inputs, hidden)
            total += nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="sum"
            ).double()
            count += targets.numel()
        loss = float(total) / max(count, 1)
        perplexity = math.inf if loss > 709.0 else math.exp(loss)  # diverged: inf, not OverflowError
        return {"perplexity": perplexity, "loss": loss, "tokens": count, "n": count,
                "split": loaders.eval_split}

    def epoch_row(self, totals: dict[str, Any], scores: dict[str, Any]) -> dict[str, Any]:
        loss = totals["loss_sum"] / max(totals["seen"], 1)
        return {"train_loss": loss, "train_perplexity": math.exp(min(loss, 700.0)),
                "eval_loss": scores.get("loss"), "eval_perplexity": scores.get("perplexity"),
                "eval_n": scores.get("n"), "split": scores.get("split")}

    def describe_scores(self, scores: dict[str, Any]) -> str:
        return f"eval perplexity {scores.get('perplexity', float('nan')):.2f}"


__all__ = ["EOS", "UNK", "Corpus", "LanguageModelTask", "SegmentLoader", "TextSource",
           "batchify", "build_vocab", "check_vocab", "corpus_loaders", "load_corpus",
           "parse_text_spec", "read_tokens", "recorded_corpus_options", "segments",
           "unigram_perplexity", "vocab_size_of"]
