"""Typer options generated from a stage's config class (``symconvert.options``).

    @app.command("finetune")
    @with_options(FinetuneConfig, unset=True)
    def finetune_command(model_dir: Path = typer.Argument(...), config: dict = None): ...

Typer sees one option per option field of the config in place of the ``config`` parameter
(same order, the field's flag, type, help and default); the command receives the values
as one dict (``unset=True``: only the options given on the command line, so that what is
left out takes the data task's default) under the parameter's name.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Any

import typer

from symconvert.options import Option, field_default, option_fields


def _cli_type(spec: Option, hint: Any) -> Any:
    if spec.many == "repeat":
        return list[str] | None
    if spec.text_type is not None:
        return spec.text_type | None
    return hint


def _shown(f: dataclasses.Field, spec: Option) -> str | bool:
    if spec.shown_default is not None:
        return spec.shown_default
    default = field_default(f)
    if isinstance(default, bool):
        return spec.flag_name(f.name).removeprefix("--") if default else \
            "no-" + spec.flag_name(f.name).removeprefix("--")
    return False if default is None else str(default)


def _help(spec: Option) -> str:
    text = spec.help
    if callable(spec.choices):  # a registry's names: listed as they are now
        text += f" One of: {', '.join(spec.allowed() or [])}."
    if spec.many == "repeat":
        text += " Repeatable."
    return text


def _flags(name: str, spec: Option, hint: Any) -> list[str]:
    flag = spec.flag_name(name)
    if hint is bool or hint == bool | None:
        flag = f"{flag}/--no-{flag.removeprefix('--')}"
    return [flag] + ([spec.short] if spec.short else [])


def option_parameters(cls: type, *, only: Iterable[str] | None = None,
                      exclude: Iterable[str] = (), unset: bool = False,
                      kind: Any = inspect.Parameter.POSITIONAL_OR_KEYWORD
                      ) -> list[inspect.Parameter]:
    """One Typer option parameter per option field of ``cls`` (``spec.cli``), in order.
    ``unset``: every default is None (shown as the field's default), so a command can
    tell the options given from those left out."""
    hints = typing.get_type_hints(cls)
    wanted = set(only) if only is not None else None
    params = []
    for f, spec in option_fields(cls):
        if not spec.cli or f.name in exclude or (wanted is not None and f.name not in wanted):
            continue
        hint = _cli_type(spec, hints[f.name])
        default = None if unset or spec.many == "repeat" else field_default(f)
        if isinstance(default, (tuple, list)):  # an empty list option: not given
            default = None
        shown = _shown(f, spec) if unset or spec.shown_default else True
        info = typer.Option(default, *_flags(f.name, spec, hint), help=_help(spec),
                            show_default=shown)
        annotation = hint if not unset or hint is Any else hint | None
        params.append(inspect.Parameter(f.name, kind, default=info, annotation=annotation))
    return params


def with_options(cls: type, *, param: str = "config", only: Iterable[str] | None = None,
                 exclude: Iterable[str] = (), unset: bool = False) -> Callable:
    """Decorator: the command's parameter ``param`` becomes ``cls``'s options (see the
    module doc); the command gets them as a dict under ``param``."""
    exclude = tuple(exclude)
    only = tuple(only) if only is not None else None

    def decorate(func: Callable) -> Callable:
        generated = option_parameters(cls, only=only, exclude=exclude, unset=unset)
        names = [p.name for p in generated]
        params: list[inspect.Parameter] = []
        for p in inspect.signature(func, eval_str=True).parameters.values():
            params += [g.replace(kind=p.kind) for g in generated] if p.name == param else [p]

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            if unset:
                values = {k: v for k, v in values.items() if v is not None}
            return func(**{param: values}, **kwargs)

        command.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


__all__ = ["option_parameters", "with_options"]
