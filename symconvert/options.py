"""One definition per option: a config dataclass field carries its help, default, bounds and
choices, and everything else is generated from it.

    @dataclass
    class FinetuneConfig(Options):
        momentum: float = option(0.9, "SGD momentum", ge=0.0, lt=1.0)

That one line is the ``--momentum`` flag of ``symconvert finetune`` (``symconvert.cli.options``
builds the Typer options), the ``finetune.momentum`` key of a recipe
(``symconvert.pipeline.schema`` builds the pydantic section), and its check:
``FinetuneConfig(momentum=1.5)`` raises ``SymconvertError("--momentum 1.5: must be less than
1")`` (``check_options``, run by ``Options.__post_init__``) before anything is created.

The stages' schemas: ``ConvertConfig`` (``symconvert.surgery.config``), ``FinetuneConfig``
(``symconvert.train.config``), ``ReportOptions`` (``symconvert.report.options``),
``ExportOptions`` (``symconvert.io.export``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from symconvert.errors import SymconvertError

Choices = Sequence[str] | Callable[[], Sequence[str]]


@dataclass(frozen=True)
class Option:
    """What a config field is as an option (kept in the field's ``metadata["option"]``)."""

    help: str
    #: the CLI flag (default ``--`` + the field name with dashes); ``short`` e.g. ``-b``
    flag: str | None = None
    short: str | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    #: allowed values (a list, or a function returning it: a registry's names)
    choices: Choices | None = None
    #: the type the CLI and a recipe take when the field's own type is looser (a loader,
    #: a tuple): e.g. ``str`` for ``decay_milestones`` ("60,120,160")
    text_type: Any = None
    #: a list option: ``"repeat"`` (``--include a --include b``; a recipe takes a string or
    #: a list) or ``"comma"`` (``--layers conv,linear``; a recipe takes ``conv,linear`` or a
    #: list); ``choices`` apply to every item
    many: str | None = None
    #: a registry check of the value (raises ``SymconvertError``): ``get_scheme`` and such
    check: Callable[[Any], Any] | None = None
    #: False: an API-only field (no flag, no recipe key)
    cli: bool = True
    recipe: bool = True
    #: the default shown in ``--help`` when the field's default is None ("task default")
    shown_default: str | None = None

    def flag_name(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")

    def allowed(self) -> list[str] | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)

    def bounds(self) -> dict[str, float]:
        return {k: v for k in ("ge", "gt", "le", "lt") if (v := getattr(self, k)) is not None}


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           default_factory: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A dataclass field that is an option (see the module doc); ``spec`` takes the
    fields of ``Option`` (``flag``, ``short``, ``ge``/``gt``/``le``/``lt``, ``choices``,
    ``text_type``, ``cli``, ``recipe``, ``shown_default``)."""
    return field(default=default, default_factory=default_factory,
                 metadata={"option": Option(help=help, **spec)})


def option_fields(cls: Any) -> Iterator[tuple[dataclasses.Field, Option]]:
    """``(field, Option)`` of every option field of a config class, in definition order."""
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("option")
        if spec is not None:
            yield f, spec


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def number_kind(f: dataclasses.Field) -> str | None:
    """``"float"``, ``"int"`` or None (not a number) from the field's annotation."""
    text = str(f.type)
    return "float" if "float" in text else "int" if re.search(r"\bint\b", text) else None


def check_value(name: str, spec: Option, value: Any, kind: str | None = "float") -> None:
    """``value`` is finite, within the bounds and one of the choices; ``None`` means "the
    default" and passes. ``kind`` (``int``/``float``) is the number the field holds. The
    message names the flag: ``--lr 0: must be greater than 0``."""
    if value is None:
        return
    flag = spec.flag_name(name)
    allowed = spec.allowed()
    if spec.check is not None:
        spec.check(value)
    if allowed is not None:
        for item in items(value, spec):
            if item not in allowed:
                raise SymconvertError(f"{flag} {item!r}: choose {_or(allowed)}")
    bounds = spec.bounds()
    if not bounds or isinstance(value, bool):
        return
    if kind == "float":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise SymconvertError(f"{flag} {value!r}: expected a number") from None
        if not math.isfinite(number):
            raise SymconvertError(f"{flag} {value}: must be a finite number")
    elif not isinstance(value, int):
        raise SymconvertError(f"{flag} {value!r}: expected a whole number")
    else:
        number = value
    _check_bounds(flag, value, number, spec)


def items(value: Any, spec: Option) -> list[Any]:
    """The items of a list option's value (``"conv,linear"`` → ``["conv", "linear"]``)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()] if spec.many == "comma" \
            else [value]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_bounds(flag: str, value: Any, number: float, spec: Option) -> None:
    low = spec.ge if spec.ge is not None else spec.gt
    high = spec.le if spec.le is not None else spec.lt
    if low is not None and high is not None:  # an interval: "must be in [0, 1)"
        inside = (number >= low if spec.ge is not None else number > low) and \
            (number <= high if spec.le is not None else number < high)
        if not inside:
            raise SymconvertError(
                f"{flag} {value}: must be in {'[' if spec.ge is not None else '('}{low:g}, "
                f"{high:g}{']' if spec.le is not None else ')'}")
        return
    for bound, fails, words in ((spec.ge, number < (spec.ge or 0), "at least"),
                                (spec.gt, number <= (spec.gt or 0), "greater than"),
                                (spec.le, number > (spec.le or 0), "at most"),
                                (spec.lt, number >= (spec.lt or 0), "less than")):
        if bound is not None and fails:
            raise SymconvertError(f"{flag} {value}: must be {words} {bound:g}")


def _or(items: Sequence[str]) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def check_options(config: Any) -> None:
    """Every option field of ``config`` (a dataclass instance) checked by ``check_value``."""
    for f, spec in option_fields(type(config)):
        check_value(f.name, spec, getattr(config, f.name), number_kind(f))


class Options:
    """Base of the stage configs: checks every option on construction. A subclass that
    normalises values in its own ``__post_init__`` calls ``super().__post_init__()`` after."""

    def __post_init__(self) -> None:
        check_options(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f, _ in option_fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (the values as they are)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


__all__ = ["Option", "Options", "check_options", "check_value", "field_default",
           "items", "number_kind", "option", "option_fields"]
