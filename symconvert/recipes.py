"""Recipes (SPEC §8): one YAML file names a whole convert → finetune → report run.

    recipe = load_recipe("recipes/quickstart.yaml", overrides=["finetune.epochs=3"])
    result = run(recipe, overwrite=True)        # writes recipe.out (the run directory)

A recipe is a tree of dataclasses: ``Recipe`` with the sections ``model``, ``selection``,
``data``, ``finetune``, ``report`` plus ``scheme`` and ``out``. ``parse_recipe`` validates a
plain mapping against the field annotations and ``metadata`` of those dataclasses (one small
validator, no schema library) and reports every problem at once, each naming its dotted key
(``finetune.lr``), what is allowed there and, for an unknown key, the closest known ones.

``model`` and ``data`` take a shorthand: ``model: timm:resnet18`` is ``model: {name: ...}``
and ``data: digits`` is ``data: {spec: digits}``. Paths (``out``, ``model.weights``, data
roots) are relative to the working directory, as on the command line.

The run directory::

    OUT/recipe.yaml                 the resolved recipe (every default filled in)
    OUT/run.log                     what ran, with timings
    OUT/converted/                  symconvert convert's directory (+ plan.json)
    OUT/finetuned/                  symconvert finetune's directory (+ metrics.jsonl, checkpoint)
    OUT/report.json, report.md, report.png
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import os
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from symconvert.errors import RecipeError, SymconvertError

RECIPE_NAME = "recipe.yaml"
LOG_NAME = "run.log"
CONVERTED_DIR = "converted"
FINETUNED_DIR = "finetuned"
REPORT_STEM = "report"
#: Everything ``run`` writes into the run directory; ``--overwrite`` removes only these.
RUN_ARTIFACTS = (RECIPE_NAME, LOG_NAME, CONVERTED_DIR, FINETUNED_DIR, "compare",
                 f"{REPORT_STEM}.json", f"{REPORT_STEM}.md", f"{REPORT_STEM}.png")


def _opt(default: Any = MISSING, *, help: str, choices: Sequence[str] | Callable[[], Sequence[str]]
         | None = None, ge: float | None = None, gt: float | None = None,
         le: float | None = None, lt: float | None = None, split: bool = False,
         example: str | None = None, factory: Callable[[], Any] | None = None,
         check: Callable[[Any], Any] | None = None) -> Any:
    """A recipe field: its default, one line of help and the checks its value must pass.

    ``split``: a string value is a comma-separated list (``layers: conv,linear``).
    ``check``: called with the value; a ``SymconvertError`` it raises becomes the key's error
    (how names are checked against the registries: schemes, models, data sources).
    """
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt,
            "split": split, "example": example, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


def _layer_kinds() -> list[str]:
    from symconvert.layers import layer_kinds

    return layer_kinds()


def _check_model(name: str) -> None:
    # parse_model only splits an explicit `timm:NAME`; ask the registry too, so that a typo
    # fails at validation rather than at the start of the run.
    from symconvert.sources import _timm_has, _torchvision_has, _unknown, parse_model

    library, bare = parse_model(name)
    if library == "timm" and not bare.startswith("hf-hub:") and not _timm_has(bare):
        raise _unknown(bare, "timm")
    if library == "torchvision" and not _torchvision_has(bare):
        raise _unknown(bare, "torchvision")


def _check_scheme(name: str) -> None:
    from symconvert.schemes import get_scheme

    get_scheme(name)


def _check_data(spec: str) -> None:
    from symconvert.data import parse_data_spec

    if _lm_text_spec(spec):
        from symconvert.lm import parse_text_spec

        parse_text_spec(spec)
        return
    parse_data_spec(spec)


def _lm_text_spec(spec: str) -> bool:
    """``text:ROOT`` read by ``symconvert.lm`` (no ``text`` source in symconvert.data)."""
    from symconvert.data import DATA_SOURCES

    return _source_name(spec) == "text" and "text" not in DATA_SOURCES


def _source_name(spec: str) -> str:
    return str(spec).strip().partition(":")[0].strip().lower()


def _check_input_size(value: str) -> None:
    from symconvert.data import parse_input_size

    parse_input_size(value)


# ----------------------------------------------------------------------------- schema


@dataclass
class ModelSection:
    """The source model (SPEC §2.1)."""

    SHORTHAND: typing.ClassVar[str] = "name"

    name: str = _opt(help="MODEL string: timm:NAME, torchvision:NAME, hf-hub:ORG/NAME, "
                     "py:package.module:function, or a bare NAME",
                     example="timm:resnet18", check=_check_model)
    pretrained: bool = _opt(True, help="load the pretrained weights")
    weights: str | None = _opt(None, help="local .safetensors/.pth weights instead of the "
                               "pretrained ones")
    num_classes: int | None = _opt(None, ge=1, help="replace the classifier head with N classes")
    kwargs: dict[str, Any] = _opt({}, help="extra keyword arguments for the model factory")


@dataclass
class SelectionSection:
    """Which layers are converted (SPEC §2.2); mirrors the convert flags."""

    include: list[str] = _opt([], help="only layers whose name matches (glob or re:REGEX)")
    exclude: list[str] = _opt([], help="skip layers whose name matches (glob or re:REGEX)")
    layers: list[str] | None = _opt(None, split=True, choices=_layer_kinds,
                                    help="layer kinds to consider (default all)")
    min_channels: int = _opt(0, ge=0, help="skip layers with fewer channels")
    include_head: bool = _opt(False, help="also convert the classifier head")
    allow_empty: bool = _opt(False, help="go on even if nothing is converted")
    target_reduction: float | None = _opt(None, gt=0.0, lt=1.0, help="convert the cheapest "
                                          "layers until the model is this fraction smaller")
    gates: list[str] | None = _opt(None, split=True, choices=("hh", "ih"),
                                   help="recurrent weights to convert: hh (default) or hh,ih")


@dataclass
class DataSection:
    """The fine-tuning and evaluation data (SPEC §6)."""

    SHORTHAND: typing.ClassVar[str] = "spec"

    spec: str = _opt(help="--data SPEC: digits, fashion-mnist[:ROOT], mnist:ROOT, cifar10:ROOT, "
                     "cifar100:ROOT, imagefolder:ROOT, text:ROOT", example="digits",
                     check=_check_data)
    input_size: str | None = _opt(None, help="H or H,W: override the model's input size",
                                  check=_check_input_size)
    subsample: int | None = _opt(None, ge=1, help="use at most N items per split (stratified)")
    augment: bool | None = _opt(None, help="random crop/flip for training (default: the data "
                                "source's own default)")
    download: bool = _opt(False, help="let torchvision download the data set if missing")


@dataclass
class FinetuneSection:
    """Fine-tuning (SPEC §6). A key left out (or null) takes the trainer's default, which the
    resolved ``recipe.yaml`` of a run spells out."""

    enabled: bool = _opt(True, help="fine-tune at all (false: convert and report only)")
    epochs: int | None = _opt(None, ge=1, help="epochs")
    lr: float | None = _opt(None, gt=0.0, help="peak learning rate")
    batch_size: int | None = _opt(None, ge=1, help="batch size per process")
    opt: str | None = _opt(None, choices=("sgd", "adamw"), help="optimiser")
    momentum: float | None = _opt(None, ge=0.0, lt=1.0, help="SGD momentum")
    sched: str | None = _opt(None, choices=("cosine", "step", "multistep", "none"), help="lr schedule")
    weight_decay: float | None = _opt(None, ge=0.0, help="weight decay")
    warmup_epochs: float | None = _opt(None, ge=0.0, help="linear warm-up epochs")
    min_lr: float | None = _opt(None, ge=0.0, help="final learning rate of the schedule")
    clip_grad: float | None = _opt(None, ge=0.0, help="max global gradient norm (0: off)")
    amp: bool | None = _opt(None, help="mixed precision (default: on for CUDA, off for CPU)")
    amp_dtype: str | None = _opt(None, choices=("bfloat16", "float16"), help="AMP dtype")
    device: str | None = _opt(None, help="auto, cpu, cuda or cuda:N")
    workers: int | None = _opt(None, ge=0, help="data-loading worker processes")
    seed: int | None = _opt(None, help="random seed")
    distill: bool | None = _opt(None, help="distil from the unconverted source model")
    distill_alpha: float | None = _opt(None, ge=0.0, le=1.0, help="weight of the KL term")
    distill_temperature: float | None = _opt(None, gt=0.0, help="distillation temperature")
    checkpoint_every: int | None = _opt(None, ge=0, help="also checkpoint every N steps")
    teacher: str | None = _opt(None, help="distil from this MODEL or model directory instead "
                               "of the source")
    extra: dict[str, Any] = _opt({}, help="more trainer settings by name (any field of "
                                 "symconvert.train.FinetuneConfig, e.g. bptt for a language "
                                 "model once the trainer has it)")


@dataclass
class ReportSection:
    """The report (SPEC §7). The table is always printed; ``formats`` are the files written.
    It is measured on ``data`` (same input size and subsample) with ``finetune.device``."""

    formats: list[str] = _opt(["json", "markdown"], split=True, choices=("json", "markdown"),
                              help="report files to write into the run directory")
    plot: bool = _opt(True, help="write report.png (per-layer savings, fine-tuning curve)")
    compare: list[str] = _opt([], split=True, choices=("prune", "dense"),
                              help="baselines fine-tuned with the same budget")
    batch_size: int | None = _opt(None, ge=1, help="evaluation batch size")
    latency_runs: int | None = _opt(None, ge=1, help="timed runs of the folded model and the "
                                    "source (median reported)")
    latency_batch: int | None = _opt(None, ge=1, help="batch size of the latency runs")


@dataclass
class Recipe:
    """A whole run: model → scheme + selection → fine-tuning on data → report, into ``out``."""

    model: ModelSection = _opt(help="the source model", example="timm:resnet18")
    scheme: str = _opt(help="symmetry scheme (see `symconvert schemes`)", example="channel",
                       check=_check_scheme)
    data: DataSection = _opt(help="data for fine-tuning and evaluation", example="digits")
    selection: SelectionSection = _opt(factory=SelectionSection, help="which layers are converted")
    finetune: FinetuneSection = _opt(factory=FinetuneSection, help="fine-tuning settings")
    report: ReportSection = _opt(factory=ReportSection, help="report settings")
    out: str | None = _opt(None, help="the run directory (default runs/<recipe name>)")
    description: str | None = _opt(None, help="free text: what this recipe is for")
    #: where the recipe came from (not a YAML key)
    path: Path | None = field(default=None, repr=False, compare=False,
                              metadata={"internal": True})

    @property
    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out).expanduser()
        stem = self.path.stem if self.path is not None else "recipe"
        return Path("runs") / stem

    def to_dict(self) -> dict[str, Any]:
        """The recipe as YAML-able data (the keys a recipe file uses)."""
        return _to_plain(self)




def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------------- validation


class _Errors:
    """Every problem found in one pass, each as ``key: message``."""

    def __init__(self, origin: str, from_set: set[str]) -> None:
        self.origin = origin
        self.from_set = from_set
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        note = " (from --set)" if key in self.from_set else ""
        self.items.append(f"{key or '<recipe>'}{note}: {message}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        head = f"recipe {self.origin} does not validate"
        if len(self.items) == 1:
            raise RecipeError(f"{head}: {self.items[0]}")
        raise RecipeError(head + ":\n  " + "\n  ".join(self.items))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            type(None): "null", Any: "anything"}.get(tp, getattr(tp, "__name__", str(tp)))


def _show(value: Any) -> str:
    text = repr(value)
    return (text[:60] + "…") if len(text) > 60 else text + f" ({type(value).__name__})"


_FAIL = object()


def _coerce(tp: Any, value: Any, key: str, meta: Mapping[str, Any], errors: _Errors) -> Any:
    """``value`` as type ``tp``, or ``_FAIL`` after recording why not."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            errors.add(key, f"must be {_type_name(tp)}, not null")
            return _FAIL
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, key, meta, errors)
        for candidate in inner:  # first that fits, without recording failures
            probe = _Errors("", set())
            out = _coerce(candidate, value, key, meta, probe)
            if out is not _FAIL:
                return out
        errors.add(key, f"expected {_type_name(tp)}, got {_show(value)}")
        return _FAIL
    if dataclasses.is_dataclass(tp):
        return _parse_section(tp, value, key, errors)
    if tp is Any:
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if meta.get("split") \
                else [value]
        if not isinstance(value, (list, tuple)):
            errors.add(key, f"expected {_type_name(tp)}, got {_show(value)}")
            return _FAIL
        items = [_coerce(item_tp, v, f"{key}[{i}]", meta, errors) for i, v in enumerate(value)]
        if any(v is _FAIL for v in items):
            return _FAIL
        return items
    if origin is dict or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            errors.add(key, f"expected a mapping of names to values, got {_show(value)}")
            return _FAIL
        return dict(value)
    if value is None:
        errors.add(key, f"must be {_type_name(tp)}, not null")
        return _FAIL
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `5e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if key.endswith("input_size") and isinstance(value, (int, list, tuple)):
            return ",".join(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    errors.add(key, f"expected {_type_name(tp)}, got {_show(value)}")
    return _FAIL


def _check_value(value: Any, key: str, meta: Mapping[str, Any], errors: _Errors) -> bool:
    if value is None:
        return True
    if isinstance(value, list):
        return all(_check_value(v, key, meta, errors) for v in value)
    choices = meta.get("choices")
    if choices is not None:
        allowed = list(choices() if callable(choices) else choices)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            errors.add(key, f"{value!r} is not one of {', '.join(allowed)}.{hint}")
            return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for bound, ok, words in (("ge", lambda v, b: v >= b, "at least"),
                                 ("gt", lambda v, b: v > b, "greater than"),
                                 ("le", lambda v, b: v <= b, "at most"),
                                 ("lt", lambda v, b: v < b, "less than")):
            b = meta.get(bound)
            if b is not None and not ok(value, b):
                errors.add(key, f"{value!r} must be {words} {b}")
                return False
    check = meta.get("check")
    if check is not None:
        try:
            check(value)
        except SymconvertError as exc:
            errors.add(key, str(exc))
            return False
    return True


def _recipe_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _parse_section(cls: type, value: Any, key: str, errors: _Errors) -> Any:
    shorthand = getattr(cls, "SHORTHAND", None)
    if value is None:
        value = {}
    if shorthand and isinstance(value, str):
        value = {shorthand: value}
    if not isinstance(value, dict):
        hint = f" or a string (its {shorthand})" if shorthand else ""
        errors.add(key, f"expected a mapping{hint}, got {_show(value)}")
        return _FAIL
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in _recipe_fields(cls)}
    prefix = f"{key}." if key else ""
    for name in value:
        if name not in fields:
            known = list(fields)
            close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            where = f"under {key}" if key else "at the top level"
            errors.add(f"{prefix}{name}", f"unknown key.{hint} Keys allowed {where}: "
                       f"{', '.join(known)}.")
    kwargs: dict[str, Any] = {}
    ok = True
    for name, f in fields.items():
        sub = f"{prefix}{name}"
        required = f.default is MISSING and f.default_factory is MISSING
        if name not in value:
            if required:
                example = f.metadata.get("example")
                ex = f" e.g. `{name}: {example}`" if example else ""
                errors.add(sub, f"missing (required): {f.metadata['help']}.{ex}")
                ok = False
            continue
        parsed = _coerce(hints[name], value[name], sub, f.metadata, errors)
        if parsed is _FAIL or not _check_value(parsed, sub, f.metadata, errors):
            ok = False
            continue
        kwargs[name] = parsed
    if not ok or any(n not in fields for n in value):
        return _FAIL
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``tree[a][b] = value`` for ``a.b``, creating mappings on the way; a scalar given to a
    section with a shorthand (``model``, ``data``) sets the shorthand field."""
    parts = [p for p in dotted.split(".")]
    if not all(parts):
        raise RecipeError(f"--set {dotted}=...: empty part in the key; write e.g. "
                          "--set finetune.epochs=3")
    node = tree
    classes: Any = Recipe
    for i, part in enumerate(parts[:-1]):
        cls = _section_class(classes, part)
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, dict):
            shorthand = getattr(cls, "SHORTHAND", None)
            if shorthand is None:
                raise RecipeError(f"--set {dotted}: {'.'.join(parts[:i + 1])} is not a "
                                  "section (it holds a single value)")
            child = {shorthand: child}
        node[part] = child
        node = child
        classes = cls
    last = parts[-1]
    cls = _section_class(classes, last)
    shorthand = getattr(cls, "SHORTHAND", None)
    if shorthand and not isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last][shorthand] = value
    else:
        node[last] = value


def _section_class(parent: Any, name: str) -> Any:
    if parent is None or not dataclasses.is_dataclass(parent):
        return None
    hints = typing.get_type_hints(parent)
    tp = hints.get(name)
    return tp if dataclasses.is_dataclass(tp) else None


def parse_override(text: str) -> tuple[str, Any]:
    """``"finetune.lr=0.1"`` → ``("finetune.lr", 0.1)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {text!r}: write KEY=VALUE, e.g. --set finetune.epochs=3 "
                          "or --set data=cifar10:/data/cifar")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {key}: the value {raw!r} is not valid YAML ({exc})") from None
    # `--set data=cifar10:/x` is a string, not YAML's {cifar10: /x}; likewise for any
    # unquoted `a:b` with no space.
    if isinstance(value, dict) and ": " not in raw and raw.strip()[:1] not in "{":
        value = raw.strip()
    return key, value


def parse_recipe(data: Any, origin: str = "<recipe>", overrides: Iterable[str] = (),
                 path: Path | None = None) -> Recipe:
    """Validate a mapping (a recipe file's contents) and apply ``--set`` overrides.

    Raises ``RecipeError`` listing every problem, each naming its dotted key.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {origin}: expected a mapping of keys (model:, scheme:, "
                          f"data:, ...) at the top level, got {_show(data)}")
    import copy

    tree = copy.deepcopy(data)
    from_set: set[str] = set()
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
        from_set.add(key)
    errors = _Errors(origin, from_set)
    recipe = _parse_section(Recipe, tree, "", errors)
    errors.raise_if_any()
    recipe.path = path
    _check_semantics(recipe, errors)
    errors.raise_if_any()
    return recipe


def _check_semantics(recipe: Recipe, errors: _Errors) -> None:
    """What one field alone cannot say: keys that only make sense together, and the
    finetune keys against the trainer that ``data`` calls for."""
    has_source = recipe.model.pretrained or recipe.model.weights is not None
    if recipe.report.compare and not has_source:
        errors.add("report.compare", "the baselines prune / fine-tune the trained source, but "
                   "the model has pretrained: false and no weights; remove report.compare or "
                   "give model.weights")
    if data_task(recipe.data.spec) == LANGUAGE_MODEL:
        _check_lm(recipe, errors)
        return
    if recipe.finetune.enabled and not has_source and recipe.finetune.teacher is None:
        from symconvert.train import FinetuneConfig

        distill = recipe.finetune.distill
        if distill is None:
            distill = FinetuneConfig.distill  # the trainer's default
        if distill:
            errors.add("finetune.distill", "distillation needs a trained teacher, but the model "
                       "has pretrained: false and no weights; set finetune.distill: false "
                       "(training the symmetric model from scratch), model.weights: FILE, "
                       "or finetune.teacher: MODEL_OR_DIR")
    extra = recipe.finetune.extra
    if extra:
        from symconvert.train import FinetuneConfig

        trainer = {f.name for f in dataclasses.fields(FinetuneConfig)}
        own = {f.name for f in _recipe_fields(FinetuneSection)}
        for name in extra:
            if name in own:
                errors.add(f"finetune.extra.{name}", f"set it as finetune.{name}, not under extra")
            elif name in {"input_size", "subsample", "augment", "download"}:
                errors.add(f"finetune.extra.{name}", f"set it as data.{name}")
            elif name not in trainer:
                close = difflib.get_close_matches(name, sorted(trainer), n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                errors.add(f"finetune.extra.{name}", "the trainer has no such setting."
                           f"{hint} Its settings: {', '.join(sorted(trainer))}.")


# ------------------------------------------------------------------- the two trainers

CLASSIFICATION = "classification"
LANGUAGE_MODEL = "language-model"
#: finetune keys the language-model trainer takes: recipe key → argument of finetune_lm
LM_KEYS = {"epochs": "epochs", "lr": "lr", "batch_size": "batch_size", "clip_grad": "clip",
           "device": "device", "seed": "seed"}
_LM_NOT_SETTINGS = {"model_dir", "data", "out", "model", "corpus", "log", "overwrite"}


def data_task(spec: str) -> str:
    """``classification`` (``symconvert.train.finetune``) or ``language-model``
    (``symconvert.lm.finetune_lm``), as the data source says."""
    from symconvert.data import DATA_SOURCES

    name = _source_name(spec)
    if name in DATA_SOURCES:
        return DATA_SOURCES[name].task
    return LANGUAGE_MODEL if name == "text" else CLASSIFICATION


def lm_parameters() -> dict[str, Any]:
    """Every setting of ``symconvert.lm.finetune_lm`` / ``train_lm`` with its default."""
    import inspect

    from symconvert import lm

    params: dict[str, Any] = {}
    for fn in (lm.finetune_lm, lm.train_lm):
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in _LM_NOT_SETTINGS:
                continue
            params.setdefault(p.name, None if p.default is p.empty else p.default)
    return params


def _check_lm(recipe: Recipe, errors: _Errors) -> None:
    ft = recipe.finetune
    params = lm_parameters()
    extra_names = sorted(set(params) - set(LM_KEYS.values()))
    takes = (f"it takes finetune.{', finetune.'.join(LM_KEYS)} and, under finetune.extra, "
             f"{', '.join(extra_names)}")
    for f in _recipe_fields(FinetuneSection):
        if f.name in LM_KEYS or f.name in ("enabled", "extra"):
            continue
        if getattr(ft, f.name) is not None:
            errors.add(f"finetune.{f.name}", "not a setting of the language-model trainer "
                       f"(symconvert.lm.finetune_lm, chosen by data: {recipe.data.spec}); {takes}")
    for name in ("input_size", "subsample", "augment"):
        if getattr(recipe.data, name) is not None:
            errors.add(f"data.{name}", "not used for a text corpus (cap it with "
                       "finetune.extra.max_tokens)")
    mapped = {arg: key for key, arg in LM_KEYS.items()}
    for name in ft.extra:
        if name in mapped:
            errors.add(f"finetune.extra.{name}", f"set it as finetune.{mapped[name]}")
        elif name not in params:
            close = difflib.get_close_matches(name, extra_names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            errors.add(f"finetune.extra.{name}", "the language-model trainer has no such "
                       f"setting.{hint} Its extra settings: {', '.join(extra_names)}.")
    if recipe.report.compare:
        errors.add("report.compare", "the prune / dense baselines are for classifiers; remove "
                   "it for a language model")


def find_recipe(name: str | os.PathLike) -> Path:
    """A recipe file: an existing path, or the NAME of a shipped recipe (``quickstart``)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise RecipeError(f"recipe {path}: not a file (give a .yaml recipe)")
    text = str(name)
    if "/" not in text and os.sep not in text:
        stem = text[:-5] if text.endswith(".yaml") else text
        for folder in recipe_dirs():
            candidate = folder / f"{stem}.yaml"
            if candidate.is_file():
                return candidate
    shipped = shipped_recipes()
    close = difflib.get_close_matches(Path(text).stem, list(shipped), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise RecipeError(f"recipe {text}: no such file, and no shipped recipe of that name.{hint} "
                      f"Shipped recipes: {', '.join(shipped) or 'none found'}.")


def recipe_dirs() -> list[Path]:
    """Where bare recipe names are looked up: ./recipes, then the recipes shipped with the
    package (``symconvert/recipes/`` in a wheel, ``recipes/`` beside the package in a clone)."""
    here = Path(__file__).resolve().parent
    dirs = [Path.cwd() / "recipes", here / "recipes", here.parent / "recipes"]
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and all(d.resolve() != s.resolve() for s in seen):
            seen.append(d)
    return seen


def shipped_recipes() -> dict[str, Path]:
    """NAME → path of every recipe found in ``recipe_dirs()`` (first one wins)."""
    found: dict[str, Path] = {}
    for folder in recipe_dirs():
        for p in sorted(folder.glob("*.yaml")):
            found.setdefault(p.stem, p)
    return found


def load_recipe(name: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Read, validate and return the recipe ``name`` (a path or a shipped recipe's name)."""
    path = find_recipe(name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise RecipeError(f"recipe {path}: cannot read it ({exc.strerror})") from None
    return parse_recipe(data, origin=str(path), overrides=overrides, path=path)


# ------------------------------------------------------------------------ resolution


def finetune_settings(recipe: Recipe) -> dict[str, Any]:
    """The keyword arguments the trainer gets: for a classifier ``symconvert.train.finetune``
    (the finetune keys that are set, the data keys it owns, ``extra``); for a language model
    ``symconvert.lm.finetune_lm`` (``LM_KEYS`` renamed, ``extra``)."""
    ft = recipe.finetune
    if data_task(recipe.data.spec) == LANGUAGE_MODEL:
        lm_settings = {arg: getattr(ft, key) for key, arg in LM_KEYS.items()
                       if getattr(ft, key) is not None}
        lm_settings.update(ft.extra)
        return lm_settings
    settings = {f.name: getattr(ft, f.name) for f in _recipe_fields(FinetuneSection)
                if f.name not in ("enabled", "teacher", "extra") and getattr(ft, f.name) is not None}
    data = recipe.data
    for name in ("input_size", "subsample", "augment"):
        if getattr(data, name) is not None:
            settings[name] = getattr(data, name)
    if data.download:
        settings["download"] = True
    settings.update(ft.extra)
    return settings


def resolve(recipe: Recipe) -> dict[str, Any]:
    """The recipe with every default spelled out (what ``recipe.yaml`` of a run holds):
    the trainer's defaults fill the finetune keys left out."""
    plain = recipe.to_dict()
    plain["out"] = str(recipe.run_dir)
    if not recipe.finetune.enabled:
        return plain
    resolved_ft = {}
    if data_task(recipe.data.spec) == LANGUAGE_MODEL:
        defaults = lm_parameters()
        for f in _recipe_fields(FinetuneSection):
            value = plain["finetune"][f.name]
            if f.name in LM_KEYS and value is None:
                value = defaults.get(LM_KEYS[f.name])
            resolved_ft[f.name] = value
    else:
        config = trainer_config(recipe)
        for f in _recipe_fields(FinetuneSection):
            if f.name in ("enabled", "teacher", "extra"):
                resolved_ft[f.name] = plain["finetune"][f.name]
            else:
                resolved_ft[f.name] = getattr(config, f.name, plain["finetune"][f.name])
    plain["finetune"] = resolved_ft
    return plain


def trainer_config(recipe: Recipe) -> Any:
    """``FinetuneConfig`` for this recipe; its own checks re-raised naming recipe keys."""
    from symconvert.train import FinetuneConfig

    settings = finetune_settings(recipe)
    try:
        return FinetuneConfig(**settings)
    except SymconvertError as exc:
        raise RecipeError(f"recipe {_origin(recipe)}: finetune: {exc}") from None
    except TypeError as exc:  # a key the trainer does not take
        raise RecipeError(f"recipe {_origin(recipe)}: finetune: {exc}") from None


def _origin(recipe: Recipe) -> str:
    return str(recipe.path) if recipe.path is not None else "<recipe>"


def dump_yaml(data: Mapping[str, Any]) -> str:
    return yaml.safe_dump(_to_plain(dict(data)), sort_keys=False, default_flow_style=False,
                          width=100)


def check_data(recipe: Recipe) -> None:
    """Fail before any heavy work if the data root named by ``data`` does not exist."""
    from symconvert.data import parse_data_spec

    if _lm_text_spec(recipe.data.spec):
        from symconvert.lm import LAYOUT, parse_text_spec

        try:
            root = parse_text_spec(recipe.data.spec)
        except SymconvertError as exc:
            raise RecipeError(f"recipe {_origin(recipe)}: data: {exc}") from None
        if not root.is_dir():
            raise RecipeError(f"recipe {_origin(recipe)}: data: {root} does not exist (data: "
                              f"{recipe.data.spec}). Expected layout: {LAYOUT}. Point the recipe "
                              "at your copy with --set data=text:/path/to/corpus.")
        return
    try:
        spec = parse_data_spec(recipe.data.spec)
    except SymconvertError as exc:
        raise RecipeError(f"recipe {_origin(recipe)}: data: {exc}") from None
    if spec.root is not None and not spec.root.exists() and not recipe.data.download:
        layout = spec.source.layout
        raise RecipeError(
            f"recipe {_origin(recipe)}: data: {spec.root} does not exist (data: {spec.text}). "
            f"Expected layout: {layout}. Point the recipe at your copy with "
            f"--set data={spec.name}:/path/to/{spec.name}."
        )


# ------------------------------------------------------------------------------- run


@dataclass
class StagePlan:
    name: str
    does: str
    writes: str


def stages(recipe: Recipe) -> list[StagePlan]:
    """What ``run`` will do, stage by stage (``--dry-run`` prints this)."""
    out = recipe.run_dir
    m = recipe.model
    weights = f"weights {m.weights}" if m.weights else ("pretrained" if m.pretrained
                                                        else "random init")
    plan = [StagePlan("convert", f"{m.name} ({weights}) with {recipe.scheme}",
                      str(out / CONVERTED_DIR))]
    if recipe.finetune.enabled and data_task(recipe.data.spec) == LANGUAGE_MODEL:
        ft = resolve(recipe)["finetune"]
        lm = {**lm_parameters(), **recipe.finetune.extra}
        plan.append(StagePlan(
            "finetune", f"on {recipe.data.spec} (symconvert.lm): {ft['epochs']} epochs, SGD lr "
            f"{ft['lr']:g}, clip {ft['clip_grad']:g}, bptt {lm.get('bptt')}, batch "
            f"{ft['batch_size']}, {lm.get('schedule')} schedule", str(out / FINETUNED_DIR)))
    elif recipe.finetune.enabled:
        cfg = trainer_config(recipe)
        teacher = (f", distilled from {recipe.finetune.teacher or 'the source'}"
                   if cfg.distill else "")
        plan.append(StagePlan(
            "finetune", f"on {recipe.data.spec}: {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, {cfg.opt} lr {cfg.lr:g}, "
            f"{cfg.sched} schedule, batch {cfg.batch_size}{teacher}", str(out / FINETUNED_DIR)))
    files = [f"{REPORT_STEM}.{'md' if f == 'markdown' else f}" for f in recipe.report.formats]
    if recipe.report.plot:
        files.append(f"{REPORT_STEM}.png")
    compare = f", compared with {' and '.join(recipe.report.compare)}" if recipe.report.compare \
        else ""
    measured = (f"accuracy on {recipe.data.spec}" if not _lm_text_spec(recipe.data.spec) else
                "parameters, bytes, per-layer table (perplexity: in run.log, from the trainer)")
    plan.append(StagePlan("report", f"{measured}{compare}",
                          ", ".join(str(out / f) for f in files) or "(printed only)"))
    return plan


@dataclass
class DryRun:
    """What ``run`` would do, found without writing anything."""

    resolved: dict[str, Any]
    stages: list[StagePlan]
    plan: Any | None  # symconvert.Plan when the model could be built
    problems: list[str]


def dry_run(recipe: Recipe, *, overwrite: bool = False, resume: bool = False,
            build_model: bool = True) -> DryRun:
    """The resolved recipe, the stages and (``build_model``) the layer plan of the
    conversion; ``problems`` lists what would stop the real run (each naming its key)."""
    resolved = resolve(recipe)
    problems: list[str] = []
    try:
        check_data(recipe)
    except RecipeError as exc:
        problems.append(str(exc))
    out = recipe.run_dir
    present = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    if present and not (overwrite or resume):
        problems.append(f"out: {out} already holds a run ({', '.join(present)}); the real run "
                        "needs --overwrite, --resume or another --set out=...")
    plan = None
    if build_model:
        import symconvert

        sel = recipe.selection
        try:
            model = build_source(recipe)
            plan = symconvert.inspect(
                model, recipe.scheme, include=sel.include or None, exclude=sel.exclude or None,
                layers=sel.layers, min_channels=sel.min_channels, include_head=sel.include_head,
                allow_empty=sel.allow_empty, target_reduction=sel.target_reduction,
                gates=sel.gates)
        except RecipeError as exc:
            problems.append(str(exc))
        except SymconvertError as exc:
            problems.append(f"model: {exc}")
    return DryRun(resolved=resolved, stages=stages(recipe), plan=plan, problems=problems)


@dataclass
class RunResult:
    """What ``run`` leaves behind."""

    out: Path
    converted: Path
    finetuned: Path | None
    report: dict[str, Any]
    files: dict[str, Path]
    seconds: dict[str, float]


class _Log:
    """``OUT/run.log``: one timestamped line per event (rank 0 only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        if self.path is None:
            return
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        with self.path.open("a") as fh:
            fh.write(f"{stamp} {message}\n")


def _prepare_out(recipe: Recipe, overwrite: bool, resume: bool) -> Path:
    out = recipe.run_dir
    if out.exists() and not out.is_dir():
        raise RecipeError(f"out: {out} exists and is not a directory")
    present = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    if present and not (overwrite or resume):
        raise RecipeError(
            f"out: {out} already holds a run ({', '.join(present)}); pass --overwrite to "
            f"replace it, --resume to continue it, or --set out=another/dir.")
    if overwrite and not resume:
        for name in present:  # only what a run writes: never the user's other files
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
    if resume and (out / RECIPE_NAME).exists():
        previous = yaml.safe_load((out / RECIPE_NAME).read_text())
        now = resolve(recipe)
        changed = sorted(k for k in set(previous) | set(now)
                         if k not in ("report", "description") and previous.get(k) != now.get(k))
        if changed:
            raise RecipeError(
                f"--resume: the recipe differs from the one in {out / RECIPE_NAME} in "
                f"{', '.join(changed)}; resume with the same recipe, or --overwrite to restart.")
    from symconvert.checkpoint import check_writable

    check_writable(out, overwrite=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _distributed() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _init_group(device: str | None) -> bool:
    """Under torchrun: join the process group early so that rank 0 alone converts and
    reports while the others wait (the trainer reuses the group)."""
    import torch

    rank, world = _distributed()
    if world <= 1 or not torch.distributed.is_available() or torch.distributed.is_initialized():
        return False
    use_cuda = torch.cuda.is_available() and (device or "auto") != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo",
                                         init_method="env://")
    return True


def _broadcast_error(failed: bool) -> bool:
    """True on every rank if any rank failed (so no rank waits forever at a barrier)."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return failed
    t = torch.tensor([1.0 if failed else 0.0])
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def build_source(recipe: Recipe) -> Any:
    """The source model the recipe names (``symconvert.create_model``)."""
    import symconvert
    from symconvert.errors import WeightsError

    m = recipe.model
    try:
        return symconvert.create_model(m.name, pretrained=m.pretrained, weights=m.weights,
                                       num_classes=m.num_classes, **m.kwargs)
    except WeightsError as exc:  # its hint names CLI flags; say the recipe keys too
        raise RecipeError(f"model: {exc} In a recipe: --set model.weights=FILE, or "
                          "--set model.pretrained=false.") from None


def convert_stage(recipe: Recipe, out: Path) -> dict[str, Any]:
    """Build the source model, convert it and write ``out`` (model, metadata, plan.json)."""
    import json

    import symconvert
    from symconvert.files import atomic_write as _atomic_write

    m, sel = recipe.model, recipe.selection
    model = build_source(recipe)
    selection = dict(include=sel.include or None, exclude=sel.exclude or None,
                     layers=sel.layers, min_channels=sel.min_channels,
                     include_head=sel.include_head, gates=sel.gates)
    model, plan = symconvert.convert(model, recipe.scheme, allow_empty=sel.allow_empty,
                                     target_reduction=sel.target_reduction, **selection)
    args = {"model": m.name, "scheme": recipe.scheme, "pretrained": m.pretrained,
            "weights": m.weights, "num_classes": m.num_classes,
            "target_reduction": sel.target_reduction, "allow_empty": sel.allow_empty,
            **selection}
    symconvert.save(model, out, extra_metadata={"convert": args}, overwrite=True)
    # the same plan.json as `symconvert convert` writes
    text = json.dumps(plan.to_dict(), indent=2) + "\n"
    _atomic_write(out / "plan.json", lambda p: Path(p).write_text(text))
    return plan.to_dict()


def run(recipe: Recipe, *, overwrite: bool = False, resume: bool = False,
        progress: bool = True, echo: Callable[[str], None] | None = None) -> RunResult:
    """convert → finetune → report into ``recipe.run_dir``; returns the report and paths.

    Under ``torchrun`` every rank calls this: rank 0 converts and reports, all ranks
    fine-tune. ``resume`` continues an interrupted run in the same directory (same recipe).
    """
    echo = echo or (lambda text: print(text, file=sys.stderr))
    rank, world = _distributed()
    main = rank == 0
    if world > 1 and data_task(recipe.data.spec) == LANGUAGE_MODEL:
        raise RecipeError("data: the language-model trainer (symconvert.lm) runs in one "
                          "process; run this recipe without torchrun")
    check_data(recipe)
    resolved = resolve(recipe)  # the trainer's own checks run here, before any work
    if recipe.finetune.enabled and data_task(recipe.data.spec) != LANGUAGE_MODEL:
        from symconvert.checks import check_finetune_args

        try:  # finite, in-range numbers before the run directory exists
            check_finetune_args(**finetune_settings(recipe))
        except SymconvertError as exc:
            raise RecipeError(f"finetune: {exc}") from None
    owns_group = _init_group(recipe.finetune.device)

    def leave_group() -> None:
        # After fine-tuning rank 0 works alone: the report's evaluation must not all-reduce
        # with ranks that have finished.
        nonlocal owns_group
        if owns_group:
            import torch

            torch.distributed.destroy_process_group()
            owns_group = False

    from symconvert.files import output_dir
    from symconvert.metadata import trust_code_default, trusting_code

    # the recipe's own py: model was named by the user, so its directories may rebuild it;
    # the run directory is locked against a second concurrent run
    trusted = trust_code_default() or str(recipe.model.name).startswith("py:")
    try:
        with trusting_code(trusted), output_dir(recipe.run_dir, enabled=main):
            return _run(recipe, resolved, overwrite, resume, progress, echo, main, leave_group)
    finally:
        leave_group()


def _run(recipe: Recipe, resolved: dict[str, Any], overwrite: bool, resume: bool,
         progress: bool, echo: Callable[[str], None], main: bool,
         leave_group: Callable[[], None]) -> RunResult:
    out = recipe.run_dir
    seconds: dict[str, float] = {}
    failed: BaseException | None = None
    if main:
        try:
            out = _prepare_out(recipe, overwrite, resume)
        except BaseException as exc:  # noqa: BLE001  (told to the other ranks, then raised)
            failed = exc
    if _broadcast_error(failed is not None):
        if failed is not None:
            raise failed
        raise RecipeError("another rank could not prepare the run directory")
    log = _Log(out / LOG_NAME if main else None)
    converted = out / CONVERTED_DIR
    finetuned = out / FINETUNED_DIR
    if main:
        (out / RECIPE_NAME).write_text(
            f"# resolved by symconvert run from {_origin(recipe)}\n" + dump_yaml(resolved))
        log(f"run {_origin(recipe)} → {out}" + (" (resume)" if resume else ""))

    # 1. convert (rank 0; the others wait in _broadcast_error)
    t0 = time.perf_counter()
    if main:
        try:
            if resume and (converted / "model.safetensors").exists():
                echo(f"convert: reusing {converted}")
                log("convert: reused")
            else:
                echo(f"convert: {recipe.model.name} with {recipe.scheme} → {converted}")
                plan = convert_stage(recipe, converted)
                log(f"convert: {plan['converted']} layers converted, parameters "
                    f"{plan['params']['before']:,} → {plan['params']['after']:,}")
        except BaseException as exc:  # noqa: BLE001
            failed = exc
            log(f"convert failed: {type(exc).__name__}: {exc}")
    if _broadcast_error(failed is not None):
        if failed is not None:
            raise failed
        raise RecipeError("rank 0 could not convert the model; see its error")
    seconds["convert"] = time.perf_counter() - t0

    # 2. finetune (every rank)
    report_dir = converted
    if recipe.finetune.enabled:
        from symconvert.train import finetune

        t0 = time.perf_counter()
        ft = recipe.finetune
        if main:
            echo(f"finetune: on {recipe.data.spec} → {finetuned}")
            log(f"finetune: start ({', '.join(f'{k}={v}' for k, v in finetune_settings(recipe).items())})")
        try:
            if data_task(recipe.data.spec) == LANGUAGE_MODEL:
                from symconvert.lm import finetune_lm

                lm_result = finetune_lm(converted, recipe.data.spec, out=finetuned,
                                        overwrite=True, **finetune_settings(recipe))
                evaluation = {"before": lm_result["before"], "after": lm_result["after"]}
                echo(f"finetune: perplexity {lm_result['before'].get('perplexity', 0):.2f} → "
                     f"{lm_result['after'].get('perplexity', 0):.2f} on the "
                     f"{lm_result['after'].get('split')} split")
            else:
                result = finetune(converted, recipe.data.spec, out=finetuned,
                                  teacher=ft.teacher,
                                  resume=resume and (finetuned / "checkpoint.pt").exists(),
                                  overwrite=True, progress=progress and main,
                                  **finetune_settings(recipe))
                evaluation = result.eval
        except BaseException as exc:
            if main:
                log(f"finetune stopped: {type(exc).__name__}: {exc}")
                if isinstance(exc, KeyboardInterrupt):
                    echo("the last checkpoint is kept: rerun the same command with --resume "
                         "to continue")
            raise
        seconds["finetune"] = time.perf_counter() - t0
        if main:
            log(f"finetune: done in {seconds['finetune']:.1f}s; eval {evaluation}")
        report_dir = finetuned

    # 3. report (rank 0, alone)
    leave_group()
    report: dict[str, Any] = {}
    files: dict[str, Path] = {}
    if main:
        t0 = time.perf_counter()
        echo("report: measuring source, converted and fine-tuned models")
        report, files = report_stage(recipe, report_dir, out,
                                     log=lambda msg: echo(f"report: {msg}"))
        seconds["report"] = time.perf_counter() - t0
        log(f"report: wrote {', '.join(str(p.name) for p in files.values())}")
        log("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return RunResult(out=out, converted=converted,
                     finetuned=finetuned if recipe.finetune.enabled else None,
                     report=report, files=files, seconds=seconds)


def report_options(recipe: Recipe) -> Any:
    """``symconvert.report.ReportOptions`` for this recipe."""
    from symconvert.report import ReportOptions

    rep, data, ft = recipe.report, recipe.data, recipe.finetune
    # A text corpus is measured by the report only once symconvert.data has a `text` source
    # (its perplexity evaluator); until then the run log holds the perplexity.
    spec = None if _lm_text_spec(data.spec) else data.spec
    kwargs: dict[str, Any] = {"data": spec, "input_size": data.input_size,
                              "subsample": data.subsample, "compare": tuple(rep.compare)}
    for key, value in (("device", ft.device), ("workers", ft.workers),
                       ("batch_size", rep.batch_size), ("latency_runs", rep.latency_runs),
                       ("latency_batch", rep.latency_batch)):
        if value is not None:
            kwargs[key] = value
    try:
        return ReportOptions(**kwargs)
    except SymconvertError as exc:
        raise RecipeError(f"recipe {_origin(recipe)}: report: {exc}") from None


def report_stage(recipe: Recipe, model_dir: Path, out: Path,
                 log: Callable[[str], None] | None = None) -> tuple[dict[str, Any],
                                                                    dict[str, Path]]:
    """Build the report of ``model_dir`` and write the files ``recipe.report`` asks for."""
    from symconvert.files import atomic_write as _atomic_write
    from symconvert.report import build_report, plot_report, render

    report = build_report(model_dir, options=report_options(recipe), log=log)
    files: dict[str, Path] = {}
    for fmt in recipe.report.formats:
        path = out / f"{REPORT_STEM}.{'md' if fmt == 'markdown' else fmt}"
        text = render(report, fmt)
        _atomic_write(path, lambda p, text=text: Path(p).write_text(text + "\n"))
        files[fmt] = path
    if recipe.report.plot:
        files["plot"] = plot_report(report, out / f"{REPORT_STEM}.png")
    return report, files
