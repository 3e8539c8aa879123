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
from symconvert.models.sources import check_registered
from symconvert.options import Option, field_default, option_fields
from symconvert.report.options import ReportOptions
from symconvert.schemes import get_scheme
from symconvert.surgery.config import ConvertConfig
from symconvert.tasks.data import parse_data_spec
from symconvert.train.config import DATA_FIELDS, FinetuneConfig

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


def _as_text(value: Any) -> Any:
    """``input_size: 16`` or ``[16, 16]`` → ``"16"`` / ``"16,16"`` (the CLI's spelling)."""
    if isinstance(value, (int, list, tuple)) and not isinstance(value, bool):
        return ",".join(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return value


def _check_model(name: str) -> None:
    # parse_model only splits an explicit `timm:NAME`; ask the registry too, so that a typo
    # fails at validation rather than at the start of the run.
    check_registered(name)


def _check_scheme(name: str) -> None:
    if str(name).strip() != "auto":  # auto: per layer one of selection.schemes
        get_scheme(name)


def _check_data(spec: str) -> None:
    parse_data_spec(spec)


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


#: recipe checks the config field cannot carry itself: calibration data is a data spec,
#: which surgery (below the tasks) does not parse
_RECIPE_CHECKS: dict[str, Callable[[Any], Any]] = {"calibrate": _check_data}


def _recipe_type(f: dataclasses.Field, spec: Option, hint: Any, unset: bool) -> Any:
    """The type (with its validators) of a config option as a recipe key: a list option
    takes a list or a string, a text option (``text_type``) also a number or a list of
    them (``input_size: 16``), each checked against the option's choices and checks."""
    checks: list[Any] = [_checked(c) for c in (spec.check, _RECIPE_CHECKS.get(f.name))
                         if c is not None]
    if spec.choices is not None:
        checks.append(_one_of(spec.choices))
    if spec.many is not None:
        nullable = unset or (spec.many == "comma" and field_default(f) is None)
        base = list[str] | None if nullable else list[str]
        return Annotated[(base, _as_list(spec.many == "comma"), *checks)]
    tp = hint
    if spec.text_type is not None:
        tp = spec.text_type | None if hint is Any else hint | spec.text_type
        checks.insert(0, BeforeValidator(_as_text))
    if unset and type(None) not in typing.get_args(tp):
        tp = tp | None
    return Annotated[(tp, *checks)] if checks else tp


def section_model(cls: type, name: str, doc: str, *, only: Sequence[str] | None = None,
                  exclude: Sequence[str] = (), unset: bool = False, first: Sequence[str] = (),
                  **own: tuple[Any, Any]) -> type[Section]:
    """A recipe section generated from a stage config's option fields (``spec.recipe``):
    each key with its type, help, default, bounds and choices. ``unset``: every default is
    None ("the stage's default"). ``own`` adds keys of the section's own, after the
    generated ones except those named in ``first``."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {k: own.pop(k) for k in first}
    for f, spec in option_fields(cls):
        if not spec.recipe or f.name in exclude or (only is not None and f.name not in only):
            continue
        info: dict[str, Any] = {"description": spec.help, **spec.bounds()}
        tp = _recipe_type(f, spec, hints[f.name], unset)
        default = None if unset else field_default(f)
        if spec.many is not None and not unset and default in (None, ()) \
                and not (spec.many == "comma" and default is None):
            info["default_factory"] = list
        else:
            info["default"] = list(default) if isinstance(default, tuple) else default
        fields[f.name] = (tp, Field(**info))
    fields.update(own)
    return pydantic.create_model(  # type: ignore[call-overload]
        name, __base__=Section, __module__=__name__, __doc__=doc, **fields)


SelectionSection = section_model(
    ConvertConfig, "SelectionSection",
    "How the model is converted besides the scheme: every key is a field of "
    "``symconvert.ConvertConfig`` (a keyword of ``symconvert.convert``/``inspect``) of the "
    "same name, passed through as is (``convert_kwargs``); a new ConvertConfig field is a "
    "new key.")


DataSection = section_model(
    FinetuneConfig, "DataSection",
    "The fine-tuning and evaluation data (SPEC §6); its other keys are the data options of "
    "``FinetuneConfig`` (the report reads the same input size and subsample).",
    only=DATA_FIELDS, first=("spec",), spec=(Annotated[str, _checked(_check_data)], Field(**_help(
        "--data SPEC: digits, fashion-mnist[:ROOT], mnist:ROOT, cifar10:ROOT, cifar100:ROOT, "
        "imagefolder:ROOT, text:ROOT", "digits"))))
DataSection.SHORTHAND = "spec"

FinetuneSection = section_model(
    FinetuneConfig, "FinetuneSection",
    "Fine-tuning (SPEC §6): every key but ``enabled``, ``teacher`` and ``extra`` is a field of "
    "``FinetuneConfig`` (a ``symconvert finetune`` flag) of the same name. A key left out (or "
    "null) takes the default of the data's task, which the resolved ``recipe.yaml`` of a run "
    "spells out.",
    exclude=DATA_FIELDS, unset=True, first=("enabled",),
    enabled=(bool, Field(True, description="fine-tune at all (false: convert and report only)")),
    teacher=(str | None, Field(None, description="distil from this MODEL or model directory "
                               "instead of the source")),
    extra=(dict[str, Any], Field(default_factory=dict, description="more trainer settings by "
                                 "name (a field of FinetuneConfig this symconvert has as no key "
                                 "of its own)")))

ReportSection = section_model(
    ReportOptions, "ReportSection",
    "The report (SPEC §7). The table is always printed; ``formats`` are the files written. "
    "It is measured on ``data`` (same input size and subsample) with ``finetune.device``; the "
    "other keys are fields of ``ReportOptions`` (``symconvert report`` flags).",
    first=("formats", "plot"), formats=(Annotated[list[str], _as_list(True), _one_of(("json", "markdown"))], Field(
        default_factory=lambda: ["json", "markdown"],
        description="report files to write into the run directory")),
    plot=(bool, Field(True, description="write report.png (per-layer savings, fine-tuning "
                                        "curve)")))


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
