"""Recipes (SPEC §8), loading: a YAML file (or a shipped recipe's name) → a validated ``Recipe``.

    recipe = load_recipe("recipes/quickstart.yaml", overrides=["finetune.epochs=3"])
    resolved = resolve(recipe)                   # every default filled in (recipe.yaml of a run)

A recipe is a tree of pydantic models (``symconvert.pipeline.schema``): ``Recipe`` with the
sections ``model``, ``selection``, ``data``, ``finetune``, ``report`` plus ``scheme`` and
``out``. ``parse_recipe`` validates a plain mapping and reports every problem at once, each
naming its dotted key (``finetune.lr``), what is allowed there and, for an unknown key, the
closest known ones. ``--set`` overrides (``parse_override``) apply before validation.

``model`` and ``data`` take a shorthand: ``model: timm:resnet18`` is ``model: {name: ...}``
and ``data: digits`` is ``data: {spec: digits}``. Paths (``out``, ``model.weights``, data
roots) are relative to the working directory, as on the command line.

Running a recipe is ``symconvert.pipeline.runner``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from symconvert.errors import RecipeError, SymconvertError
from symconvert.pipeline.schema import (
    FinetuneSection,
    Problems,
    Recipe,
    Section,
    section_of,
    show,
    validate_recipe,
)
from symconvert.tasks.data import parse_data_spec
from symconvert.train.config import FinetuneConfig, task_config


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, Section):
        return obj.model_dump(mode="json")
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------------- validation


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
        cls = section_of(classes, part)
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
    cls = section_of(classes, last)
    shorthand = getattr(cls, "SHORTHAND", None)
    if shorthand and not isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last][shorthand] = value
    else:
        node[last] = value


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
                          f"data:, ...) at the top level, got {show(data)}")

    tree = copy.deepcopy(data)
    from_set: set[str] = set()
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
        from_set.add(key)
    errors = Problems(origin, from_set)
    recipe = validate_recipe(tree, errors)
    errors.raise_if_any()
    assert recipe is not None
    recipe._path = path
    _check_semantics(recipe, errors)
    errors.raise_if_any()
    return recipe


def _check_semantics(recipe: Recipe, errors: Problems) -> None:
    """What one field alone cannot say: keys that only make sense together, and the
    finetune keys against the trainer that ``data`` calls for."""
    has_source = recipe.model.pretrained or recipe.model.weights is not None
    if recipe.report.compare and not has_source:
        errors.add("report.compare", "the baselines prune / fine-tune the trained source, but "
                   "the model has pretrained: false and no weights; remove report.compare or "
                   "give model.weights")
    if recipe.finetune.enabled and not has_source and recipe.finetune.teacher is None:
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
        trainer = {f.name for f in dataclasses.fields(FinetuneConfig)}
        own = set(FinetuneSection.model_fields)
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
    package = Path(__file__).resolve().parent.parent  # symconvert/
    dirs = [Path.cwd() / "recipes", package / "recipes", package.parent / "recipes"]
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
    """The keyword arguments ``symconvert.train.run.finetune`` gets, whatever the task: the
    finetune keys that are set, the data keys it owns, ``extra``."""
    ft = recipe.finetune
    settings = {name: getattr(ft, name) for name in FinetuneSection.model_fields
                if name not in ("enabled", "teacher", "extra") and getattr(ft, name) is not None}
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
    config = trainer_config(recipe)
    for name in FinetuneSection.model_fields:
        if name in ("enabled", "teacher", "extra"):
            resolved_ft[name] = plain["finetune"][name]
        else:
            resolved_ft[name] = getattr(config, name, plain["finetune"][name])
    plain["finetune"] = resolved_ft
    return plain


def trainer_config(recipe: Recipe) -> Any:
    """``FinetuneConfig`` for this recipe (the data's task fills what it leaves out); its
    own checks re-raised naming recipe keys."""
    try:
        return FinetuneConfig(**task_config(recipe.data.spec, finetune_settings(recipe)))
    except SymconvertError as exc:
        raise RecipeError(f"recipe {recipe_origin(recipe)}: finetune: {exc}") from None
    except TypeError as exc:  # a key the trainer does not take
        raise RecipeError(f"recipe {recipe_origin(recipe)}: finetune: {exc}") from None


def recipe_origin(recipe: Recipe) -> str:
    return str(recipe.path) if recipe.path is not None else "<recipe>"


def dump_yaml(data: Mapping[str, Any]) -> str:
    return yaml.safe_dump(_to_plain(dict(data)), sort_keys=False, default_flow_style=False,
                          width=100)


def check_data(recipe: Recipe) -> None:
    """Fail before any heavy work if the data root named by ``data`` does not exist."""
    try:
        spec = parse_data_spec(recipe.data.spec)
    except SymconvertError as exc:
        raise RecipeError(f"recipe {recipe_origin(recipe)}: data: {exc}") from None
    if spec.root is not None and not spec.root.exists() and not recipe.data.download:
        layout = spec.source.layout
        raise RecipeError(
            f"recipe {recipe_origin(recipe)}: data: {spec.root} does not exist (data: {spec.text}). "
            f"Expected layout: {layout}. Point the recipe at your copy with "
            f"--set data={spec.name}:/path/to/{spec.name}."
        )
