"""Sequence classification of ``hf:`` models with a head (``*ForSequenceClassification``):
``--data tsv:ROOT`` and top-1 accuracy.

``ROOT/train.tsv`` and ``ROOT/test.tsv`` (else ``dev.tsv``): one example per line,
``TEXT<TAB>LABEL`` with integer labels ``0 … num_labels-1`` (a header line whose label is
not a number is skipped). Each text is tokenized with the model's own ``tokenizer.json``
(its special tokens added), cut to 128 tokens (or the model's positions) and padded with the tokenizer's pad
id; batches are ``(input_ids, attention_mask, labels)`` and the model sees the mask.
Calibration takes the ``input_ids`` alone (padding then is attended to: prefer text of
similar lengths).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from symconvert.errors import DataError
from symconvert.tasks.base import Metric, StepOutput, register_task
from symconvert.tasks.data import DataSource, DataSpec, LoaderOptions, Loaders, register_data_source
from symconvert.tasks.hf_text import HFTextTask, SequenceLoader, read_tokenizer, sequence_length

LAYOUT = ("ROOT/train.tsv and ROOT/test.tsv (or dev.tsv): TEXT<TAB>LABEL per line, integer "
          "labels from 0")
MAX_LINES = 2_000_000


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if number > MAX_LINES:
                    raise DataError(f"{path} has more than {MAX_LINES:,} lines.")
                text, tab, label = line.rstrip("\n").rpartition("\t")
                if not tab:
                    if line.strip():
                        raise DataError(f"{path}:{number}: no TAB; expected {LAYOUT}.")
                    continue
                if not label.strip().isdigit():
                    if number == 1:  # a header
                        continue
                    raise DataError(f"{path}:{number}: label {label!r} is not an integer; "
                                    f"expected {LAYOUT}.")
                texts.append(text)
                labels.append(int(label))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason}); expected {LAYOUT}.") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}; expected {LAYOUT}.") from None
    if not texts:
        raise DataError(f"{path} holds no examples; expected {LAYOUT}.")
    return texts, labels


def encode(tokenizer: Any, texts: list[str], length: int, pad: int) -> torch.Tensor:
    """``[N, 2, length]``: the ids and the attention mask of each text."""
    out = torch.full((len(texts), 2, length), 0, dtype=torch.long)
    out[:, 0] = pad
    for i, enc in enumerate(tokenizer.encode_batch(texts)):
        ids = enc.ids[:length]
        out[i, 0, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        out[i, 1, :len(ids)] = 1
    return out


class ExampleLoader(SequenceLoader):
    """``(input_ids, attention_mask, labels)`` batches."""

    def __init__(self, data: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
                 seed: int = 0) -> None:
        super().__init__(torch.cat([data.flatten(1), labels[:, None]], dim=1), batch_size,
                         shuffle, seed)
        self.length = data.shape[-1]

    def __iter__(self):
        for batch, _ in super().__iter__():
            ids, mask = batch[:, :self.length], batch[:, self.length:2 * self.length]
            yield ids, mask, batch[:, -1]


@register_data_source
class TsvSource(DataSource):
    name = "tsv"
    task = "hf-classification"
    layout = LAYOUT
    example = "tsv:data/sst2"

    def loaders(self, spec: DataSpec, model: nn.Module | None, options: LoaderOptions) -> Loaders:
        root = Path(spec.root)
        files = {"train": root / "train.tsv",
                 "eval": next((root / n for n in ("test.tsv", "dev.tsv") if (root / n).is_file()),
                              root / "test.tsv")}
        for path in files.values():
            if not path.is_file():
                raise self.missing(path, "no such file")
        if model is None or getattr(model, "hf_kind", None) != "sequence-classification":
            raise DataError(f"--data {spec.text} is for hf: models with a classification head.")
        tokenizer = read_tokenizer(model)
        pad = tokenizer.token_to_id("[PAD]") or int(getattr(model.config, "pad_token_id", 0) or 0)
        num = int(model.config.num_labels)
        made = {}
        for key in (("train", "eval") if options.train else ("eval",)):
            texts, labels = read_tsv(files[key])
            if options.subsample:
                texts, labels = texts[:options.subsample], labels[:options.subsample]
            if max(labels) >= num:
                raise DataError(f"{files[key]}: label {max(labels)} but the model's head has "
                                f"{num} classes.")
            made[key] = ExampleLoader(encode(tokenizer, texts, sequence_length(model), pad), torch.tensor(labels),
                                      options.batch_size if key == "train" else 32,
                                      key == "train", options.seed)
        return Loaders(spec=spec, train=made.get("train"), eval=made["eval"], num_classes=num,
                       eval_split=files["eval"].stem, task=self.task,
                       n_train=len(made["train"].data) if "train" in made else 0,
                       n_eval=len(made["eval"].data))


@register_task
class HFClassificationTask(HFTextTask):
    name = "hf-classification"
    kind = "sequence-classification"
    reads = ()  # labelled text only (tsv:, its own source)
    unit = "ex"
    items = "examples"
    score_metrics = (Metric("top1", "top-1", percent=True),)
    score_title = "accuracy"
    model_kind = "a transformers sequence classifier"

    def describe_n(self, n: int | None) -> str:
        return "n = —" if n is None else f"n = {n:,}"

    def step(self, model: nn.Module, teacher: nn.Module | None, batch: Any,
             device: torch.device, config: Any, carry: Any) -> tuple[StepOutput, Any]:
        ids, mask, labels = (t.to(device) for t in batch)
        logits = model(ids, mask)
        soft = None
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(ids, mask)
        loss = self.mixed_loss(logits, labels, soft, config)
        correct = int((logits.detach().argmax(1) == labels).sum())
        return StepOutput(loss=loss, seen=labels.numel(), correct=correct), None

    @torch.no_grad()
    def metrics(self, model: nn.Module, loaders: Any, device: torch.device,
                autocast: contextlib.AbstractContextManager | None = None) -> dict[str, Any]:
        correct = seen = 0
        loaders.eval.set_epoch(0)
        for ids, mask, labels in loaders.eval:
            with autocast or contextlib.nullcontext():
                logits = model(ids.to(device), mask.to(device))
            correct += int((logits.argmax(1).cpu() == labels).sum())
            seen += labels.numel()
        return {"top1": correct / max(seen, 1), "n": seen, "split": loaders.eval_split}

    def epoch_row(self, totals: dict[str, Any], scores: dict[str, Any]) -> dict[str, Any]:
        seen = max(totals["seen"], 1)
        return {"train_loss": totals["loss_sum"] / seen, "train_top1": totals["correct"] / seen,
                "eval_top1": scores.get("top1"), "eval_n": scores.get("n"),
                "split": scores.get("split")}


__all__ = ["ExampleLoader", "HFClassificationTask", "TsvSource", "read_tsv"]
