"""The recipe schema (SPEC §8) as pydantic models, and its errors in recipe words.

Each section is a model with ``extra="forbid"``; a field's ``description`` is its help, its
bounds are pydantic's, and the checks against symconvert's registries (schemes, models, data
sources, layer kinds) are validators that turn a ``SymconvertError`` into the key's error.
``validate_recipe`` runs pydantic once and rewrites every problem as ``dotted.key: message``:
the type expected and the value given, the allowed choices with the closest one, an unknown
key with the closest known keys, a missing key with an example.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar

import pydantic
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from symconvert.errors import RecipeError, SymconvertError

# ------------------------------------------------------------------------ field kinds


def _checked(check: Callable[[Any], Any]) -> AfterValidator:
    """A registry check: its ``SymconvertError`` becomes the key's message."""

    def run(value: Any) -> Any:
        if value is None:
            return value
        try:
            check(value)
        except SymconvertError as exc:
            raise ValueError(str(exc)) from None
        return value

    return AfterValidator(run)


def _one_of(choices: Sequence[str] | Callable[[], Sequence[str]]) -> AfterValidator:
    def run(value: Any) -> Any:
        allowed = list(choices() if callable(choices) else choices)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item not in allowed:
                close = difflib.get_close_matches(str(item), allowed, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{item!r} is not one of {', '.join(allowed)}.{hint}")
        return value

    return AfterValidator(run)


def _as_list(split: bool) -> BeforeValidator:
    """A string is one item, or (``split``) a comma-separated list: ``layers: conv,linear``."""

    def run(value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()] if split else [value]
        return value

    return BeforeValidator(run)


def _size_text(value: Any) -> Any:
    """``input_size: 16`` or ``[16, 16]`` → ``"16"`` / ``"16,16"`` (the CLI's spelling)."""
    if isinstance(value, (int, list, tuple)) and not isinstance(value, bool):
        return ",".join(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return value


def _layer_kinds() -> list[str]:
    from symconvert.surgery.layers import layer_kinds

    return layer_kinds()


def _check_model(name: str) -> None:
    # parse_model only splits an explicit `timm:NAME`; ask the registry too, so that a typo
    # fails at validation rather than at the start of the run.
    from symconvert.models.sources import _timm_has, _torchvision_has, _unknown, parse_model

    library, bare = parse_model(name)
    if library == "timm" and not bare.startswith("hf-hub:") and not _timm_has(bare):
        raise _unknown(bare, "timm")
    if library == "torchvision" and not _torchvision_has(bare):
        raise _unknown(bare, "torchvision")


def _check_scheme(name: str) -> None:
    from symconvert.schemes import get_scheme

    if str(name).strip() != "auto":  # auto: per layer one of selection.schemes
        get_scheme(name)


def _check_schemes(names: list[str] | None) -> None:
    from symconvert.surgery.auto import parse_schemes

    if names is not None:
        parse_schemes(names)


def _check_data(spec: str) -> None:
    from symconvert.tasks.data import parse_data_spec

    parse_data_spec(spec)


def _check_input_size(value: str) -> None:
    from symconvert.tasks.data import parse_input_size

    parse_input_size(value)


def _help(text: str, example: str | None = None) -> Any:
    return {"description": text, **({"json_schema_extra": {"example": example}} if example else {})}


# ----------------------------------------------------------------------------- schema


class Section(BaseModel):
    """A recipe section: unknown keys are errors; ``SHORTHAND`` names the field a bare
    string sets (``model: timm:resnet18`` is ``model: {name: timm:resnet18}``)."""

    model_config = ConfigDict(extra="forbid")
    SHORTHAND: ClassVar[str | None] = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is None:
            return {}
        if cls.SHORTHAND and isinstance(value, str):
            return {cls.SHORTHAND: value}
        return value


class ModelSection(Section):
    """The source model (SPEC §2.1)."""

    SHORTHAND: ClassVar[str | None] = "name"

    name: Annotated[str, _checked(_check_model)] = Field(**_help(
        "MODEL string: timm:NAME, torchvision:NAME, hf-hub:ORG/NAME, py:package.module:function, "
        "or a bare NAME", "timm:resnet18"))
    pretrained: bool = Field(True, description="load the pretrained weights")
    weights: str | None = Field(None, description="local .safetensors/.pth weights instead of "
                                "the pretrained ones")
    num_classes: int | None = Field(None, ge=1, description="replace the classifier head with "
                                    "N classes")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments "
                                   "for the model factory")


# ConvertConfig's fields that are not ``selection`` keys: the scheme is a top-level key and
# ``costs`` (a mapping of (layer, scheme) pairs, or a function) exists in the API only.
_NOT_SELECTION = ("scheme", "costs")
# The recipe's spelling of the ConvertConfig fields whose Python type is looser than a YAML
# value (a list or a string; a loader or tensor as calibration data), with the checks
# against symconvert's registries. Every other field keeps its ConvertConfig type; name,
# default, help and bounds always come from ConvertConfig. A list type that does not take
# null (include, exclude) defaults to [] (no filter), as the resolved recipe.yaml shows.
_RECIPE_TYPES: dict[str, Any] = {
    "include": Annotated[list[str], _as_list(False)],
    "exclude": Annotated[list[str], _as_list(False)],
    "layers": Annotated[list[str] | None, _as_list(True), _one_of(_layer_kinds)],
    "gates": Annotated[list[str] | None, _as_list(True), _one_of(("hh", "ih"))],
    "schemes": Annotated[list[str] | None, _as_list(True), _checked(_check_schemes)],
    "calibrate": Annotated[str | None, _checked(_check_data)],
}
_BOUND_NAMES = ("ge", "gt", "le", "lt")


def _selection_field(field: dataclasses.Field, hints: dict[str, Any]) -> tuple[Any, Any]:
    """``(type, FieldInfo)`` of one ConvertConfig field as a recipe key."""
    tp = _RECIPE_TYPES.get(field.name, hints[field.name])
    bounds = {k: v for k, v in field.metadata.items() if k in _BOUND_NAMES}
    info: dict[str, Any] = {"description": field.metadata.get("help"), **bounds}
    if field.default is None and typing.get_origin(tp) is Annotated \
            and typing.get_args(tp)[0] == list[str]:
        info["default_factory"] = list
    else:
        info["default"] = field.default
    return tp, Field(**info)


def _selection_section() -> type[Section]:
    from symconvert.surgery.config import ConvertConfig

    hints = typing.get_type_hints(ConvertConfig)
    fields = {f.name: _selection_field(f, hints) for f in dataclasses.fields(ConvertConfig)
              if f.name not in _NOT_SELECTION}
    return pydantic.create_model(  # type: ignore[call-overload]
        "SelectionSection", __base__=Section, __module__=__name__,
        __doc__="How the model is converted besides the scheme: every key is a field of "
        "``symconvert.ConvertConfig`` (a keyword of ``symconvert.convert``/``inspect``) of the "
        "same name, passed through as is (``convert_kwargs``); a new ConvertConfig field is a "
        "new key.", **fields)


SelectionSection = _selection_section()


class DataSection(Section):
    """The fine-tuning and evaluation data (SPEC §6)."""

    SHORTHAND: ClassVar[str | None] = "spec"

    spec: Annotated[str, _checked(_check_data)] = Field(**_help(
        "--data SPEC: digits, fashion-mnist[:ROOT], mnist:ROOT, cifar10:ROOT, cifar100:ROOT, "
        "imagefolder:ROOT, text:ROOT", "digits"))
    input_size: Annotated[str | None, BeforeValidator(_size_text),
                          _checked(_check_input_size)] = Field(
        None, description="H or H,W: override the model's input size")
    subsample: int | None = Field(None, ge=1, description="use at most N items per split "
                                  "(stratified; text: N tokens)")
    augment: bool | None = Field(None, description="random crop/flip for training (default: "
                                 "the data source's own default)")
    download: bool = Field(False, description="let torchvision download the data set if missing")


class FinetuneSection(Section):
    """Fine-tuning (SPEC §6). A key left out (or null) takes the default of the data's task,
    which the resolved ``recipe.yaml`` of a run spells out."""

    enabled: bool = Field(True, description="fine-tune at all (false: convert and report only)")
    epochs: int | None = Field(None, ge=1, description="epochs")
    lr: float | None = Field(None, gt=0.0, description="peak learning rate")
    batch_size: int | None = Field(None, ge=1, description="batch size per process")
    opt: Annotated[str | None, _one_of(("sgd", "adamw"))] = Field(None, description="optimiser")
    momentum: float | None = Field(None, ge=0.0, lt=1.0, description="SGD momentum")
    sched: Annotated[str | None, _one_of(("cosine", "step", "multistep", "none"))] = Field(
        None, description="lr schedule")
    weight_decay: float | None = Field(None, ge=0.0, description="weight decay")
    warmup_epochs: float | None = Field(None, ge=0.0, description="linear warm-up epochs")
    min_lr: float | None = Field(None, ge=0.0, description="final learning rate of the schedule")
    clip_grad: float | None = Field(None, ge=0.0, description="max global gradient norm (0: off)")
    amp: bool | None = Field(None, description="mixed precision (default: on for CUDA, off for CPU)")
    amp_dtype: Annotated[str | None, _one_of(("bfloat16", "float16"))] = Field(
        None, description="AMP dtype")
    device: str | None = Field(None, description="auto, cpu, cuda or cuda:N")
    workers: int | None = Field(None, ge=0, description="data-loading worker processes")
    seed: int | None = Field(None, description="random seed")
    distill: bool | None = Field(None, description="distil from the unconverted source model")
    distill_alpha: float | None = Field(None, ge=0.0, le=1.0, description="weight of the KL term")
    distill_temperature: float | None = Field(None, gt=0.0, description="distillation temperature")
    checkpoint_every: int | None = Field(None, ge=0, description="also checkpoint every N steps")
    teacher: str | None = Field(None, description="distil from this MODEL or model directory "
                                "instead of the source")
    extra: dict[str, Any] = Field(default_factory=dict, description="more trainer settings by "
                                  "name (any field of symconvert.train.config.FinetuneConfig, e.g. bptt, "
                                  "log_interval)")


class ReportSection(Section):
    """The report (SPEC §7). The table is always printed; ``formats`` are the files written.
    It is measured on ``data`` (same input size and subsample) with ``finetune.device``."""

    formats: Annotated[list[str], _as_list(True), _one_of(("json", "markdown"))] = Field(
        default_factory=lambda: ["json", "markdown"],
        description="report files to write into the run directory")
    plot: bool = Field(True, description="write report.png (per-layer savings, fine-tuning curve)")
    compare: Annotated[list[str], _as_list(True), _one_of(("prune", "dense"))] = Field(
        default_factory=list, description="baselines fine-tuned with the same budget")
    batch_size: int | None = Field(None, ge=1, description="evaluation batch size")
    latency_runs: int | None = Field(None, ge=1, description="timed runs of the folded model "
                                     "and the source (median reported)")
    latency_batch: int | None = Field(None, ge=1, description="batch size of the latency runs")


class Recipe(Section):
    """A whole run: model → scheme + selection → fine-tuning on data → report, into ``out``."""

    model: ModelSection = Field(**_help("the source model", "timm:resnet18"))
    scheme: Annotated[str, _checked(_check_scheme)] = Field(**_help(
        "symmetry scheme (see `symconvert schemes`)", "channel"))
    data: DataSection = Field(**_help("data for fine-tuning and evaluation", "digits"))
    selection: SelectionSection = Field(default_factory=SelectionSection,
                                        description="which layers are converted")
    finetune: FinetuneSection = Field(default_factory=FinetuneSection,
                                      description="fine-tuning settings")
    report: ReportSection = Field(default_factory=ReportSection, description="report settings")
    out: str | None = Field(None, description="the run directory (default runs/<recipe name>)")
    description: str | None = Field(None, description="free text: what this recipe is for")
    _path: Path | None = PrivateAttr(default=None)  # where the recipe came from (not a key)

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out).expanduser()
        stem = self.path.stem if self.path is not None else "recipe"
        return Path("runs") / stem

    def to_dict(self) -> dict[str, Any]:
        """The recipe as YAML-able data (the keys a recipe file uses)."""
        return self.model_dump(mode="json")

    def convert_kwargs(self) -> dict[str, Any]:
        """The keywords of ``symconvert.convert``/``inspect`` (empty lists: no filter)."""
        return {k: (v if v != [] else None) for k, v in self.selection.model_dump().items()}


def section_of(parent: type[BaseModel] | None, name: str) -> type[Section] | None:
    """The section model a key of ``parent`` holds (None for a plain value)."""
    if parent is None or name not in parent.model_fields:
        return None
    tp = parent.model_fields[name].annotation
    return tp if isinstance(tp, type) and issubclass(tp, Section) else None


# ----------------------------------------------------------------------------- errors


class Problems:
    """Every problem found, each as ``key: message``; ``--set`` keys are marked."""

    def __init__(self, origin: str, from_set: set[str]) -> None:
        self.origin, self.from_set = origin, from_set
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


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true/false", "string": "a string",
             "list": "a list", "dict": "a mapping", "model": "a mapping"}
_BOUNDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "greater than"),
           "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}


def show(value: Any) -> str:
    text = repr(value)
    return (text[:60] + "…") if len(text) > 60 else text + f" ({type(value).__name__})"


def _key(loc: Sequence[Any]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _section_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    cls: type[BaseModel] | None = Recipe
    for part in loc:
        cls = section_of(cls, str(part))
    return cls


def _message(err: dict[str, Any]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    loc = err["loc"]
    if kind == "missing":
        cls = _section_at(loc[:-1])
        field = cls.model_fields.get(str(loc[-1])) if cls is not None else None
        help_ = field.description if field is not None else ""
        example = ((field.json_schema_extra or {}).get("example")
                   if field is not None and isinstance(field.json_schema_extra, dict) else None)
        return f"missing (required): {help_}." + (f" e.g. `{loc[-1]}: {example}`" if example else "")
    if kind == "extra_forbidden":
        cls = _section_at(loc[:-1])
        known = list(cls.model_fields) if cls is not None else []
        prefix = f"{_key(loc[:-1])}." if len(loc) > 1 else ""
        close = difflib.get_close_matches(str(loc[-1]), known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
        where = f"under {_key(loc[:-1])}" if len(loc) > 1 else "at the top level"
        return f"unknown key.{hint} Keys allowed {where}: {', '.join(known)}."
    if kind in _BOUNDS:
        name, words = _BOUNDS[kind]
        return f"{value!r} must be {words} {ctx.get(name)}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    base = kind.split("_")[0]
    if base in _EXPECTED and kind.endswith(("_type", "_parsing", "_from_float", "_attributes")):
        shorthand = getattr(_section_at(loc), "SHORTHAND", None) if base == "model" else None
        also = f" or a string (its {shorthand})" if shorthand else ""
        return f"expected {_EXPECTED[base]}{also}, got {show(value)}"
    return f"{err['msg']}, got {show(value)}"


def validate_recipe(tree: dict[str, Any], problems: Problems) -> Recipe | None:
    """``Recipe`` from a mapping, or None with every problem added to ``problems``."""
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            problems.add(_key(err["loc"]), _message(err))
    return None


__all__ = ["DataSection", "FinetuneSection", "ModelSection", "Problems", "Recipe",
           "ReportSection", "Section", "SelectionSection", "section_of", "show",
           "validate_recipe"]
