"""Word-level language modelling: the ``text:ROOT`` corpus, BPTT training, perplexity.

The paper's language-model setting (its code builds on PyTorch's
``examples/word_language_model``):

* ``text:ROOT``: ``ROOT/train.txt``, ``valid.txt``, ``test.txt`` in PTB format — whitespace
  tokens, one sentence or paragraph per line, ``<eos>`` appended to every line. The
  vocabulary comes from the training text (optionally capped to the most frequent words);
  words it lacks become ``<unk>``.
* Training: truncated BPTT over ``batch_size`` parallel streams (``batchify``), plain SGD,
  gradient-norm clipping, the hidden state carried across segments and detached; after an
  epoch without validation improvement the learning rate is divided by ``anneal``, and
  the best weights (by validation loss) are kept. Defaults are the paper's: lr 20, clip
  0.25, bptt 35, batch 20. Short budgets: ``schedule="linear"`` (lr decays to 0 over the
  run) with ``max_batches`` / ``time_limit`` and a truncated corpus (``max_tokens``).
* Evaluation: perplexity = exp(mean negative log-likelihood per predicted token).

A model fits when ``model(tokens[T, B], hidden) -> (logits[T, B, V], hidden)`` with
``hidden=None`` meaning a zero state — ``symconvert.models.lstm_lm`` does.

    corpus = load_corpus("text:data/ptb")
    model = symconvert.create_model("py:symconvert.models.lstm_lm:lstm_lm", pretrained=False,
                                    vocab_size=len(corpus.vocab))
    train_lm(model, corpus, epochs=6)
    evaluate_lm(model, corpus, "test")   # {"perplexity": ..., "loss": ..., "tokens": ..., "split": "test"}
    finetune_lm("lm-channel", "text:data/ptb", "lm-channel/finetuned", epochs=2)
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from symconvert.errors import DataError, SymconvertError, TrainingError

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
LAYOUT = "ROOT/train.txt, ROOT/valid.txt and/or ROOT/test.txt (PTB format: whitespace tokens, one line per sentence)"
METRICS_NAME = "metrics.jsonl"


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


def check_vocab(model: nn.Module, corpus: Corpus) -> None:
    size = vocab_size_of(model)
    if size is not None and size != len(corpus.vocab):
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


def _device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    if device is None:
        param = next(model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")
    from symconvert.evaluate import resolve_device

    return resolve_device(device)


# ----------------------------------------------------------------------------- evaluate


@torch.no_grad()
def evaluate_lm(model: nn.Module, corpus: Corpus, split: str | None = None, *,
                batch_size: int = 10, bptt: int = 35,
                device: str | torch.device | None = None) -> dict[str, Any]:
    """``{"perplexity", "loss", "tokens", "split"}`` on ``split`` (default: the corpus's eval
    split): mean NLL per predicted token (nats) over ``batch_size`` streams read in order,
    eval mode, fp32. The model's train/eval mode is restored."""
    split = split or corpus.eval_split
    if split not in corpus.splits:
        raise DataError(f"the corpus at {corpus.root} has no {split!r} split "
                        f"(it has {', '.join(corpus.splits)}).")
    check_vocab(model, corpus)
    dev = _device(device, model)
    model.to(dev)
    source = batchify(corpus.splits[split], batch_size).to(dev)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=dev)
    count = 0
    hidden = None
    try:
        for inputs, targets in segments(source, bptt):
            logits, hidden = model(inputs, hidden)
            total += nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="sum"
            ).double()
            count += targets.numel()
    finally:
        model.train(was_training)
    loss = float(total) / count
    return {"perplexity": math.exp(loss), "loss": loss, "tokens": count, "split": split}


def unigram_perplexity(corpus: Corpus, split: str | None = None) -> float:
    """Perplexity on ``split`` of the add-one-smoothed unigram model of the train split,
    over the same vocabulary: the baseline a language model must beat by far."""
    split = split or corpus.eval_split
    size = len(corpus.vocab)
    counts = torch.bincount(corpus.splits["train"], minlength=size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(float(-logp[corpus.splits[split]].mean()))


# ----------------------------------------------------------------------------- train


SCHEDULES = ("plateau", "linear")


def train_lm(
    model: nn.Module,
    corpus: Corpus,
    epochs: int = 40,
    *,
    lr: float = 20.0,
    clip: float = 0.25,
    bptt: int = 35,
    batch_size: int = 20,
    schedule: str = "plateau",
    anneal: float = 4.0,
    max_batches: int | None = None,
    time_limit: float | None = None,
    eval_batch_size: int = 10,
    device: str | torch.device | None = None,
    seed: int = 0,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place by truncated BPTT on the train split (paper defaults).

    ``schedule="plateau"`` (the paper's): when the corpus has a ``valid`` split it is
    evaluated after every epoch; no improvement divides the learning rate by ``anneal``,
    and the best weights are restored at the end. ``schedule="linear"`` (short budgets): the
    learning rate falls linearly to 0 over the run, so a run of a few hundred steps ends
    converged instead of wherever lr 20 left it. ``max_batches`` caps the segments per
    epoch; ``time_limit`` (seconds) stops after the segment that passes it. Returns one
    metrics row per epoch (also passed to ``log``).
    """
    check_vocab(model, corpus)
    if epochs < 1:
        raise SymconvertError(f"epochs must be at least 1, got {epochs}")
    if schedule not in SCHEDULES:
        raise SymconvertError(f"unknown schedule {schedule!r}; choose {' or '.join(SCHEDULES)}.")
    dev = _device(device, model)
    model.to(dev)
    torch.manual_seed(seed)
    train = batchify(corpus.splits["train"], batch_size).to(dev)
    per_epoch = math.ceil((train.size(0) - 1) / bptt)
    if max_batches is not None:
        per_epoch = min(per_epoch, max_batches)
    total_steps = per_epoch * epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    plateau = schedule == "plateau" and "valid" in corpus.splits
    best_loss, best_state = math.inf, None
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    step = 0
    for epoch in range(epochs):
        model.train()
        hidden = None
        total, count = 0.0, 0
        epoch_start = time.monotonic()
        for batch, (inputs, targets) in enumerate(segments(train, bptt)):
            if batch >= per_epoch:
                break
            if schedule == "linear":
                for group in optimizer.param_groups:
                    group["lr"] = lr * (1 - step / total_steps)
            hidden = _detach(hidden)
            logits, hidden = model(inputs, hidden)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                               targets.reshape(-1))
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss at epoch {epoch + 1}, segment {batch + 1} "
                    f"(lr {optimizer.param_groups[0]['lr']:g}); lower the learning rate or the "
                    "clip norm.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            total += float(loss.detach()) * targets.numel()
            count += targets.numel()
            step += 1
            if time_limit is not None and time.monotonic() - started > time_limit:
                break
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": total / count,
            "train_perplexity": math.exp(total / count),
            "tokens": count,
            "seconds": time.monotonic() - epoch_start,
        }
        if "valid" in corpus.splits:
            val = evaluate_lm(model, corpus, "valid", batch_size=eval_batch_size, bptt=bptt)
            row.update(valid_loss=val["loss"], valid_perplexity=val["perplexity"])
            if plateau:
                if val["loss"] < best_loss:
                    best_loss = val["loss"]
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    for group in optimizer.param_groups:
                        group["lr"] /= anneal
        rows.append(row)
        if log is not None:
            log(row)
        if time_limit is not None and time.monotonic() - started > time_limit:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return rows


# ----------------------------------------------------------------------------- model dirs


def finetune_lm(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike | None = None,
    epochs: int = 6,
    lr: float = 20.0,
    *,
    corpus: Corpus | None = None,
    max_vocab: int | None = None,
    files: dict[str, str | None] | None = None,
    max_tokens: int | dict[str, int] | None = None,
    overwrite: bool = False,
    **train_options: Any,
) -> dict[str, Any]:
    """Fine-tune the language model in ``model_dir`` (a converted or dense model directory)
    on ``data`` (``text:ROOT``) and write ``out`` (default ``model_dir/finetuned``): the model
    directory plus ``metrics.jsonl``. Returns ``{"out", "before", "after", "metrics"}``, the
    ``before``/``after`` entries being ``evaluate_lm`` results on the eval split.

    The vocabulary must be the model's: ``max_vocab`` and ``files`` default to what the
    model directory records (``lm`` metadata written by ``finetune_lm``/``save_lm``).
    ``train_options`` go to ``train_lm`` (bptt, batch_size, clip, max_batches, ...).
    """
    import symconvert
    from symconvert.checkpoint import check_writable
    from symconvert.files import atomic_write as _atomic_write

    model_dir = Path(model_dir)
    out = Path(out) if out is not None else model_dir / "finetuned"
    check_writable(out, overwrite=overwrite)
    model = symconvert.load(model_dir)
    recorded = (getattr(model, "symconvert_metadata", None) or {}).get("lm", {})
    if corpus is None:
        names = files if files is not None else recorded.get("files")
        # recorded files list only the splits that were present: the others stay unread
        kwargs = ({"train": names.get("train") or "train.txt", "valid": names.get("valid"),
                   "test": names.get("test")} if names else {})
        corpus = load_corpus(
            data,
            max_vocab=max_vocab if max_vocab is not None else recorded.get("max_vocab"),
            max_tokens=max_tokens if max_tokens is not None else recorded.get("max_tokens"),
            **kwargs,
        )
    check_vocab(model, corpus)
    eval_options = {k: train_options[k] for k in ("bptt", "device") if k in train_options}
    eval_options["batch_size"] = train_options.get("eval_batch_size", 10)
    before = evaluate_lm(model, corpus, **eval_options)
    out.mkdir(parents=True, exist_ok=True)
    metrics: list[dict[str, Any]] = []

    def log(row: dict[str, Any]) -> None:
        metrics.append(row)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in metrics)
        _atomic_write(out / METRICS_NAME, lambda p: Path(p).write_text(text))

    train_lm(model, corpus, epochs, lr=lr, log=log, **train_options)
    after = evaluate_lm(model, corpus, **eval_options)
    model.to("cpu")
    args = {"data": str(data), "epochs": epochs, "lr": lr, "max_tokens": max_tokens,
            **{k: v for k, v in train_options.items() if k != "log"}}
    args = json.loads(json.dumps(args, default=str))
    symconvert.save(model, out, overwrite=True, extra_metadata={
        "finetune": {"args": args, "eval": after, "before": before, "epochs_run": len(metrics)},
        "parent": str(model_dir.resolve()),
        "lm": corpus.describe(),
    })
    return {"out": out, "before": before, "after": after, "metrics": metrics}


def save_lm(model: nn.Module, out: str | os.PathLike, corpus: Corpus, *,
            source: dict | None = None, extra_metadata: dict | None = None,
            overwrite: bool = True) -> Path:
    """``symconvert.save`` plus the corpus description (vocabulary size, hash, files, cap)
    that ``finetune_lm`` and ``check_vocab`` read back."""
    import symconvert

    meta = {"lm": corpus.describe(), **(extra_metadata or {})}
    return symconvert.save(model, out, source=source, extra_metadata=meta, overwrite=overwrite)


__all__ = [
    "EOS",
    "UNK",
    "Corpus",
    "batchify",
    "build_vocab",
    "check_vocab",
    "evaluate_lm",
    "finetune_lm",
    "load_corpus",
    "read_tokens",
    "save_lm",
    "segments",
    "train_lm",
    "unigram_perplexity",
    "vocab_size_of",
]
