"""``ReportOptions``: how ``build_report`` measures, every option defined once (the
``symconvert report`` flags and the recipe's ``report`` keys are generated from it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from symconvert.checks import parse_input_size
from symconvert.errors import SymconvertError
from symconvert.options import Options, option

COMPARE_KINDS = ("structured", "lowrank", "prune", "dense")


@dataclass
class ReportOptions(Options):
    """How to measure. ``data``, ``device``, ``subsample``, ``input_size`` and ``workers``
    come from a recipe's ``data`` and ``finetune`` sections (``recipe=False`` here)."""

    data: str | None = option(
        None, "Eval data for the accuracy rows: digits | fashion-mnist[:ROOT] | mnist:ROOT | "
        "cifar10:ROOT | cifar100:ROOT | imagefolder:ROOT | text:ROOT. Without it, accuracy is "
        "left out (with the reason).", short="-d", recipe=False)
    device: str = option("auto", "auto (CUDA when available), cpu, cuda, cuda:N; used for "
                         "accuracy, latency and baselines.", recipe=False)
    batch_size: int = option(256, "Evaluation batch size.", ge=1, short="-b")
    subsample: int | None = option(None, "Evaluate on at most N items of the eval split "
                                   "(stratified, deterministic).", ge=1, recipe=False)
    input_size: str | None = option(None, "Input size H or H,W (default: the model's "
                                    "pretrained config).", text_type=str,
                                    check=parse_input_size, recipe=False)
    workers: int = option(0, "Data-loading worker processes.", ge=0, recipe=False)
    latency_runs: int = option(10, "Timed forward passes per model (the median is reported).",
                               ge=1)
    latency_batch: int = option(8, "Batch size of the latency runs.", ge=1)
    compare: tuple[str, ...] = option(
        (), "Baselines at the same budget, comma-separated: structured (Torch-Pruning channel "
        "pruning of the source to the same number of removed parameters), lowrank (truncated "
        "SVD of every conv/linear, whitened by the calibration data when converted with "
        "--calibrate), prune (global L1 magnitude pruning), dense (the source). Each is "
        "fine-tuned alike. Needs --data.", many="comma", text_type=str, choices=COMPARE_KINDS)
    #: rich progress bars while fine-tuning baselines
    progress: bool = option(False, "Progress bars while fine-tuning baselines.", cli=False,
                            recipe=False)

    def __post_init__(self) -> None:
        self.compare = tuple(parse_compare(self.compare))
        super().__post_init__()
        if self.compare and not self.data:
            raise SymconvertError(
                f"--compare {','.join(self.compare)} needs --data SPEC: the baselines are "
                "judged by their accuracy on the eval split (e.g. --data digits)."
            )


def parse_compare(value: str | Sequence[str] | None) -> list[str]:
    """``"prune,dense"`` → ``["prune", "dense"]`` (order kept, duplicates dropped)."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else [
        part for v in value for part in str(v).split(",")]
    out: list[str] = []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        if item not in COMPARE_KINDS:
            raise SymconvertError(
                f"--compare {item!r}: choose from {', '.join(COMPARE_KINDS)} "
                "(e.g. --compare prune,dense)."
            )
        if item not in out:
            out.append(item)
    return out


__all__ = ["COMPARE_KINDS", "ReportOptions", "parse_compare"]
