"""Recipes (SPEC §8): one YAML file names a whole convert → finetune → report run.

    recipe = load_recipe("recipes/quickstart.yaml", overrides=["finetune.epochs=3"])
    result = run(recipe, overwrite=True)        # writes recipe.out (the run directory)

A recipe is a tree of pydantic models (``symconvert.pipeline.schema``): ``Recipe`` with the
sections ``model``, ``selection``, ``data``, ``finetune``, ``report`` plus ``scheme`` and
``out``. ``parse_recipe`` validates a plain mapping and reports every problem at once, each
naming its dotted key (``finetune.lr``), what is allowed there and, for an unknown key, the
closest known ones. ``run`` calls the library API the CLI calls (``symconvert.convert``
with the selection keywords, ``symconvert.train.run.finetune``, ``symconvert.report.build``).

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
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

RECIPE_NAME = "recipe.yaml"
LOG_NAME = "run.log"
CONVERTED_DIR = "converted"
FINETUNED_DIR = "finetuned"
REPORT_STEM = "report"
#: Everything ``run`` writes into the run directory; ``--overwrite`` removes only these.
RUN_ARTIFACTS = (RECIPE_NAME, LOG_NAME, CONVERTED_DIR, FINETUNED_DIR, "compare",
                 f"{REPORT_STEM}.json", f"{REPORT_STEM}.md", f"{REPORT_STEM}.png")


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
    import copy

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
        from symconvert.train.config import FinetuneConfig

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
        from symconvert.train.config import FinetuneConfig

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
    from symconvert.train.config import FinetuneConfig, task_config

    try:
        return FinetuneConfig(**task_config(recipe.data.spec, finetune_settings(recipe)))
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
    from symconvert.tasks.data import parse_data_spec

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
    if recipe.finetune.enabled:
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
    from symconvert.tasks import task_for_data

    metric = "perplexity" if task_for_data(recipe.data.spec).primary == "perplexity" else "accuracy"
    measured = f"{metric} on {recipe.data.spec}"
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

        try:
            model = build_source(recipe)
            kwargs = recipe.convert_kwargs()
            for key in ("calibrate", "calibration_samples"):  # convert-only (a dry run
                kwargs.pop(key, None)                         # measures nothing)
            plan = symconvert.inspect(model, recipe.scheme, **kwargs)
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
    from symconvert.io.checkpoint import check_writable

    check_writable(out, overwrite=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _distributed() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _init_group(device: str | None) -> bool:
    """Under torchrun: join the process group early so that rank 0 alone converts and
    reports while the others wait (the trainer reuses the group). True if it created it."""
    from symconvert.train.distributed import setup_distributed
    from symconvert.train.evaluate import resolve_device

    dist, _ = setup_distributed(resolve_device(device or "auto"))
    return dist.owns_group


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
    from symconvert.io.files import atomic_write as _atomic_write

    m = recipe.model
    model = build_source(recipe)
    selection = recipe.convert_kwargs()  # the same keywords `symconvert convert` passes
    model, plan = symconvert.convert(model, recipe.scheme, **selection)
    args = {"model": m.name, "scheme": recipe.scheme, "pretrained": m.pretrained,
            "weights": m.weights, "num_classes": m.num_classes, "model_kwargs": m.kwargs,
            **selection,
            **({"schemes": plan.schemes} if hasattr(plan, "schemes") else {})}
    extra = {"convert": args}
    if selection.get("calibrate") is not None:
        from symconvert.surgery.calibrate import calibration_record

        extra["calibration"] = calibration_record(plan)
    symconvert.save(model, out, extra_metadata=extra, overwrite=True)
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
    check_data(recipe)
    resolved = resolve(recipe)  # the trainer's own checks run here, before any work
    if recipe.finetune.enabled:
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

    from symconvert.io.files import output_dir
    from symconvert.io.metadata import trust_code_default, trusting_code

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
        seconds["finetune"] = _finetune_step(recipe, converted, finetuned, resume, progress,
                                             echo, log, main)
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


def _finetune_step(recipe: Recipe, converted: Path, finetuned: Path, resume: bool,
                   progress: bool, echo: Callable[[str], None], log: _Log, main: bool) -> float:
    """``symconvert.train.run.finetune`` of the converted directory, as the CLI calls it; the
    seconds it took."""
    from symconvert.train.run import finetune

    t0 = time.perf_counter()
    settings = finetune_settings(recipe)
    if main:
        echo(f"finetune: on {recipe.data.spec} → {finetuned}")
        log(f"finetune: start ({', '.join(f'{k}={v}' for k, v in settings.items())})")
    try:
        result = finetune(converted, recipe.data.spec, out=finetuned,
                          teacher=recipe.finetune.teacher,
                          resume=resume and (finetuned / "checkpoint.pt").exists(),
                          overwrite=True, progress=progress and main, **settings)
    except BaseException as exc:
        if main:
            log(f"finetune stopped: {type(exc).__name__}: {exc}")
            if isinstance(exc, KeyboardInterrupt):
                echo("the last checkpoint is kept: rerun the same command with --resume "
                     "to continue")
        raise
    seconds = time.perf_counter() - t0
    if main:
        log(f"finetune: done in {seconds:.1f}s; eval {result.eval}")
    return seconds


def report_options(recipe: Recipe) -> Any:
    """``symconvert.report.build.ReportOptions`` for this recipe."""
    from symconvert.report.build import ReportOptions

    rep, data, ft = recipe.report, recipe.data, recipe.finetune
    kwargs: dict[str, Any] = {"data": data.spec, "input_size": data.input_size,
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
    from symconvert.io.files import atomic_write as _atomic_write
    from symconvert.report.build import build_report
    from symconvert.report.plot import plot_report
    from symconvert.report.render import render

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
