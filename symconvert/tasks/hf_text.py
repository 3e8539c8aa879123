"""Text tasks of Hugging Face models (``hf:``): causal-LM perplexity and sentence-embedding
fidelity, on ``text:ROOT`` read with the model's own tokenizer.

``text:ROOT`` for an ``hf:`` model: ``ROOT/train.txt`` (or, when absent, ``valid.txt`` — as in
WikiText-2 without its train split) is the training and calibration text; ``test.txt``
(else ``valid.txt``) is the evaluation text. Each file is tokenized with the
``tokenizer.json`` of the model's source directory (the ``tokenizers`` library, local
files only), the ids concatenated and cut into sequences of ``SEQUENCE`` tokens (the
model's positions, if fewer); an encoder's sequences are wrapped in ``[CLS] … [SEP]``.
Every sequence has the same length, so no attention mask is needed: calibration runs
``model(input_ids)`` on the train batches as they are. ``--subsample N`` caps each split
at N tokens.

* ``hf-causal-lm``: perplexity = exp(mean next-token cross-entropy) over the evaluation
  sequences (each sequence's first token is not predicted); training is next-token
  cross-entropy, distilled from the source's logits when it is the teacher.
* ``hf-embedding``: fidelity = mean cosine between the model's mean-pooled embedding of
  each evaluation sequence and the source model's (1.0 for the source itself); training
  pulls the student's token states to the teacher's (1 − cosine).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from symconvert.errors import DataError
from symconvert.models.hf import is_hf, tokenizer_dir
from symconvert.models.sources import create_model_from_source
from symconvert.tasks.base import Metric, StepOutput, Task, register_task
from symconvert.tasks.data import DataSpec, LoaderOptions, Loaders

try:
    import tokenizers
except ImportError:  # the hf extra: pip install 'symconvert[hf]'
    tokenizers = None

SEQUENCE = 128
EVAL_BATCH = 16
LAYOUT = ("ROOT/train.txt (else valid.txt) for training and calibration, ROOT/test.txt (else "
          "valid.txt) for evaluation: plain UTF-8 text")
MAX_TEXT_BYTES = 200_000_000


def read_tokenizer(model: nn.Module) -> Any:
    """The ``tokenizers.Tokenizer`` of the model's source directory."""
    if tokenizers is None:
        raise DataError("text data for hf: models needs the tokenizers package: pip install "
                        "'symconvert[hf]'.")
    directory = tokenizer_dir(model)
    path = directory / "tokenizer.json" if directory is not None else None
    if path is None or not path.is_file():
        raise DataError(f"the model's source directory ({directory}) has no tokenizer.json: "
                        "symconvert reads text for hf: models with the model's own tokenizer.")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001  (a damaged tokenizer file: bad input)
        raise DataError(f"{path} is not a readable tokenizer: {exc}") from None


def encode_file(tokenizer: Any, path: Path, max_tokens: int | None = None) -> torch.Tensor:
    """The ids of a text file's non-blank lines, concatenated (no special tokens)."""
    try:
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise DataError(f"{path} is larger than {MAX_TEXT_BYTES:,} bytes.")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason}); expected {LAYOUT}.") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}; expected {LAYOUT}.") from None
    ids: list[int] = []
    for start in range(0, len(lines), 2000):
        chunk = [ln for ln in lines[start:start + 2000] if ln]
        for enc in tokenizer.encode_batch(chunk, add_special_tokens=False) if chunk else ():
            ids.extend(enc.ids)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def sequences(ids: torch.Tensor, length: int, wrap: tuple[int, int] | None) -> torch.Tensor:
    """``[N, length]`` sequences of ``ids`` (the tail that does not fill one is dropped);
    ``wrap`` = (cls, sep) puts each body between them."""
    body = length - (2 if wrap else 0)
    n = ids.numel() // body
    if n < 1:
        raise DataError(f"{ids.numel()} tokens cannot fill one sequence of {length}.")
    out = ids[: n * body].view(n, body)
    if wrap:
        cls = torch.full((n, 1), wrap[0], dtype=torch.long)
        sep = torch.full((n, 1), wrap[1], dtype=torch.long)
        out = torch.cat([cls, out, sep], dim=1)
    return out


class SequenceLoader:
    """``(ids, ids)`` batches of fixed-length sequences; the train loader shuffles per
    epoch (seeded), ``set_epoch(epoch, start)`` positions it (resume)."""

    def __init__(self, data: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.data, self.batch_size, self.shuffle, self.seed = data, max(1, batch_size), shuffle, seed
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        order = torch.arange(len(self.data))
        if self.shuffle:
            order = torch.randperm(len(self.data),
                                   generator=torch.Generator().manual_seed(self.seed * 1009 + self.epoch))
        for i in range(self.start, len(self)):
            batch = self.data[order[i * self.batch_size:(i + 1) * self.batch_size]]
            yield batch, batch


def _files(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise DataError(f"text folder {root} does not exist; expected {LAYOUT}.")
    train = next((root / n for n in ("train.txt", "valid.txt") if (root / n).is_file()), None)
    evaluation = next((root / n for n in ("test.txt", "valid.txt") if (root / n).is_file()), None)
    if train is None or evaluation is None or train == evaluation:
        raise DataError(f"{root}: expected {LAYOUT} (two different files).")
    return {"train": train, "eval": evaluation}


def sequence_length(model: nn.Module) -> int:
    """``SEQUENCE``, or the model's positions when it has fewer."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(SEQUENCE, int(positions or SEQUENCE))


def hf_text_loaders(spec: DataSpec, model: nn.Module, options: LoaderOptions) -> Loaders:
    """``text:ROOT`` loaders for an ``hf:`` model (see the module docstring)."""
    if model.hf_kind not in ("causal-lm", "encoder"):
        raise DataError(f"--data {spec.text}: {type(model.model).__name__} is a sequence "
                        "classifier; give it labelled text: tsv:ROOT (TEXT<TAB>LABEL lines).")
    files = _files(Path(spec.root))
    tokenizer = read_tokenizer(model)
    length = sequence_length(model)
    wrap = None
    if model.hf_kind == "encoder":
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        wrap = (cls, sep) if cls is not None and sep is not None else None
    split = {"train": None, "eval": None}
    for key in (("train", "eval") if options.train else ("eval",)):
        ids = encode_file(tokenizer, files[key], options.subsample)
        split[key] = sequences(ids, length, wrap)
    vocab = int(model.config.vocab_size)
    for key, data in split.items():
        if data is not None and int(data.max()) >= vocab:
            raise DataError(f"{files[key]}: the tokenizer gives id {int(data.max())} but the "
                            f"model has {vocab} embeddings; tokenizer and model do not match.")
    task = HFEmbeddingTask.name if model.hf_kind == "encoder" else HFCausalLMTask.name
    train = split["train"]
    evaluation = split["eval"]
    return Loaders(spec=spec, task=task, num_classes=vocab, eval_split=files["eval"].stem,
                   train=SequenceLoader(train, options.batch_size, True, options.seed)
                   if train is not None else None,
                   eval=SequenceLoader(evaluation, min(EVAL_BATCH, options.eval_batch_size
                                                       or EVAL_BATCH), False),
                   n_train=int(train.numel()) if train is not None else 0,
                   n_eval=int(evaluation.numel()),
                   meta={"files": {k: str(v) for k, v in files.items()}, "sequence": length})


class HFTextTask(Task):
    """What both hf: text tasks share: the model kind they claim, example inputs."""

    kind = ""
    unit = "tok"
    items = "tokens"
    input_names = ("input_ids",)
    reads = ("text",)
    defaults = {"lr": 1e-4, "opt": "adamw", "clip_grad": 1.0, "batch_size": 16,
                "weight_decay": 0.0, "momentum": 0.9}

    def claims(self, model: nn.Module, meta: dict[str, Any]) -> bool:
        return is_hf(model) and model.hf_kind == self.kind

    def describe_n(self, n: int | None) -> str:
        return f"{'—' if n is None else f'{n:,}'} tokens"

    def example_inputs(self, model: nn.Module, batch_size: int = 1,
                       input_size: Any = None) -> tuple[torch.Tensor, ...]:
        length = sequence_length(model) if input_size is None else int(input_size)
        return (torch.zeros(batch_size, length, dtype=torch.long),)

    def describe_scores(self, scores: dict[str, Any]) -> str:
        return f"eval {self.metric.label} {self.metric.format(scores.get(self.metric.key))}"


@register_task
class HFCausalLMTask(HFTextTask):
    name = "hf-causal-lm"
    kind = "causal-lm"
    score_metrics = (Metric("perplexity", "perplexity", higher_is_better=False),)
    score_title = "perplexity"
    model_kind = "a transformers causal language model"

    def step(self, model: nn.Module, teacher: nn.Module | None, batch: Any,
             device: torch.device, config: Any, carry: Any) -> tuple[StepOutput, Any]:
        ids = batch[0].to(device)
        logits = model(ids)[:, :-1]
        soft = None
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(ids)[:, :-1]
        loss = self.mixed_loss(logits, ids[:, 1:], soft, config)
        return StepOutput(loss=loss, seen=ids[:, 1:].numel()), None

    @torch.no_grad()
    def metrics(self, model: nn.Module, loaders: Any, device: torch.device,
                autocast: contextlib.AbstractContextManager | None = None) -> dict[str, Any]:
        total, count = 0.0, 0
        loaders.eval.set_epoch(0)
        for ids, _ in loaders.eval:
            ids = ids.to(device)
            with autocast or contextlib.nullcontext():
                logits = model(ids)[:, :-1]
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                           ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
        loss = total / max(count, 1)
        return {"perplexity": math.inf if loss > 709.0 else math.exp(loss), "loss": loss,
                "tokens": count, "n": count, "split": loaders.eval_split}

    def epoch_row(self, totals: dict[str, Any], scores: dict[str, Any]) -> dict[str, Any]:
        loss = totals["loss_sum"] / max(totals["seen"], 1)
        return {"train_loss": loss, "train_perplexity": math.exp(min(loss, 700.0)),
                "eval_loss": scores.get("loss"), "eval_perplexity": scores.get("perplexity"),
                "eval_n": scores.get("n"), "split": scores.get("split")}


def mean_pooled(states: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: the mean of the token states (no padding: all count)."""
    return states.float().mean(dim=1)


_REFERENCE: dict[str, torch.Tensor] = {}


def reference_embeddings(model: nn.Module, loaders: Any, device: torch.device) -> torch.Tensor:
    """The source model's embeddings of the evaluation sequences (cached per source and
    text, so a report evaluating three models builds the source once)."""
    source = getattr(model, "symconvert_source", None)
    if not source:
        raise DataError("embedding fidelity compares with the source model, and this model "
                        "does not record one.")
    data = loaders.eval.data
    key = hashlib.sha256(repr(sorted((k, str(v)) for k, v in source.items() if k != "config"))
                         .encode() + data.numpy().tobytes()).hexdigest()
    if key not in _REFERENCE:
        reference = create_model_from_source(source).to(device).eval()
        _REFERENCE.clear()
        _REFERENCE[key] = torch.cat([mean_pooled(reference(ids.to(device))).cpu()
                                     for ids, _ in loaders.eval])
    return _REFERENCE[key]


@register_task
class HFEmbeddingTask(HFTextTask):
    name = "hf-embedding"
    kind = "encoder"
    score_metrics = (Metric("fidelity", "embedding cosine", percent=True),)
    score_title = "embedding fidelity (mean cosine to the source's)"
    model_kind = "a transformers encoder (sentence embeddings)"

    def step(self, model: nn.Module, teacher: nn.Module | None, batch: Any,
             device: torch.device, config: Any, carry: Any) -> tuple[StepOutput, Any]:
        if teacher is None:
            raise DataError("fine-tuning an encoder for embedding fidelity needs the source as "
                            "teacher: leave --distill on.")
        ids = batch[0].to(device)
        states = model(ids)
        with torch.no_grad():
            target = teacher(ids)
        loss = (1 - F.cosine_similarity(states.float(), target.float(), dim=-1)).mean()
        return StepOutput(loss=loss, seen=ids.numel()), None

    @torch.no_grad()
    def metrics(self, model: nn.Module, loaders: Any, device: torch.device,
                autocast: contextlib.AbstractContextManager | None = None) -> dict[str, Any]:
        reference = reference_embeddings(model, loaders, device)
        loaders.eval.set_epoch(0)
        mine = []
        for ids, _ in loaders.eval:
            with autocast or contextlib.nullcontext():
                mine.append(mean_pooled(model(ids.to(device))).cpu())
        cos = F.cosine_similarity(torch.cat(mine), reference, dim=-1)
        n = int(loaders.eval.data.numel())
        return {"fidelity": float(cos.mean()), "fidelity_min": float(cos.min()),
                "sequences": len(cos), "n": n, "split": loaders.eval_split}

    def epoch_row(self, totals: dict[str, Any], scores: dict[str, Any]) -> dict[str, Any]:
        return {"train_loss": totals["loss_sum"] / max(totals["seen"], 1),
                "eval_fidelity": scores.get("fidelity"), "eval_n": scores.get("n"),
                "split": scores.get("split")}


__all__ = ["HFCausalLMTask", "HFEmbeddingTask", "SequenceLoader", "encode_file",
           "hf_text_loaders", "mean_pooled", "read_tokenizer", "reference_embeddings",
           "sequence_length", "sequences"]
