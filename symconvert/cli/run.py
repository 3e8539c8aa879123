"""CLI command of the recipes: ``symconvert run RECIPE.yaml [--set key=value ...]``."""

from __future__ import annotations

import time

import typer
import yaml
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from symconvert.cli.app import app, console, err_console
from symconvert.errors import RecipeError
from symconvert.io.metadata import TRUST_CODE_HELP, trusting_code
from symconvert.pipeline.load import dump_yaml, load_recipe, shipped_recipes
from symconvert.pipeline.runner import RunResult, dry_run, run
from symconvert.pipeline.schema import Recipe
from symconvert.report.render import render_table
from symconvert.report.tables import plan_table, totals_line


def _list_recipes() -> None:
    table = Table(title="shipped recipes (symconvert run NAME)")
    for col in ("name", "model", "scheme", "data", "description"):
        table.add_column(col, overflow="fold")
    for name, path in shipped_recipes().items():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            table.add_row(name, "", "", "", f"[red]unreadable: {escape(str(exc))}[/]")
            continue
        model = data.get("model")
        model = model.get("name") if isinstance(model, dict) else model
        spec = data.get("data")
        spec = spec.get("spec") if isinstance(spec, dict) else spec
        desc = str(data.get("description") or "").strip().splitlines()
        table.add_row(name, escape(str(model)), escape(str(data.get("scheme"))),
                      escape(str(spec)), escape(desc[0] if desc else ""))
    console.print(table)


@app.command("run")
def run_command(
    recipe: str | None = typer.Argument(
        None, help="A recipe file, or the name of a shipped recipe (quickstart, "
        "wrn-cifar10-channel, resnet101-imagenet-channel, ...). Without it: list them."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a recipe key: --set finetune.epochs=3, --set "
        "data=cifar10:/data/cifar, --set model.pretrained=false (dotted key, YAML value). "
        "Repeatable."),
    dry: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe, the "
                                 "stages and the layer plan; write nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in the "
                                   "run directory (only the files a run writes)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in the "
                                "run directory (same recipe): reuse the converted model, "
                                "resume fine-tuning from its checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="Progress bars while fine-tuning."),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP + " (A "
                                    "recipe's own py: model is always trusted.)"),
) -> None:
    """Run a recipe: convert → finetune → report into its run directory (`out`), which then
    holds recipe.yaml (resolved), run.log, converted/, finetuned/ and report.json/.md/.png.
    Prints the report at the end.

    Examples:

      symconvert run recipes/quickstart.yaml            # offline, CPU, a few minutes

      symconvert run quickstart --set out=runs/qs --overwrite

      symconvert run quickstart --set finetune.epochs=2 --set data.subsample=200 --dry-run

      symconvert run wrn-cifar10-channel --set data=cifar10:/data/cifar

      symconvert run resnet101-imagenet-channel --set data=imagefolder:/data/imagenet --dry-run

      torchrun --standalone --nproc-per-node 8 -m symconvert run resnet101-imagenet-channel --set data=imagefolder:/data/imagenet

      symconvert run                                     # list the shipped recipes
    """
    if recipe is None:
        _list_recipes()
        return
    parsed = load_recipe(recipe, overrides=overrides)
    if dry:
        _print_dry_run(parsed, overwrite, resume)
        return
    start = time.perf_counter()
    with trusting_code(trust_code):
        result = run(parsed, overwrite=overwrite, resume=resume, progress=progress,
                     echo=lambda text: err_console.print(text, highlight=False, markup=False))
    if result.report:  # a non-zero torchrun rank: rank 0 prints
        _print_result(result, time.perf_counter() - start)


def _print_result(result: RunResult, wall: float) -> None:
    console.print(*render_table(result.report))
    files = ", ".join(str(p) for p in result.files.values())
    console.print(f"run directory [bold]{result.out}[/]: recipe.yaml, run.log, converted/, "
                  f"{'finetuned/, ' if result.finetuned else ''}{files}", highlight=False)
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    console.print(f"done in {wall:.0f}s ({stages})", highlight=False)


def _print_dry_run(recipe: Recipe, overwrite: bool, resume: bool) -> None:
    plan = dry_run(recipe, overwrite=overwrite, resume=resume)
    console.print(f"[bold]resolved recipe[/] ({recipe.path or '<recipe>'}, with --set applied "
                  "and defaults filled in):", highlight=False)
    console.print(Syntax(dump_yaml(plan.resolved), "yaml", theme="ansi_dark",
                         background_color="default"))
    table = Table(title="stages (dry run: nothing is written)")
    for col in ("stage", "does", "writes"):
        table.add_column(col, overflow="fold")
    for st in plan.stages:
        table.add_row(st.name, st.does, st.writes)
    console.print(table)
    if plan.plan is not None:
        console.print(plan_table(plan.plan, f"{recipe.model.name} — {plan.plan.scheme}",
                                 show_skipped=False, max_rows=60))
        console.print(totals_line(plan.plan))
    if plan.problems:
        raise RecipeError("the run would stop here:\n  " + "\n  ".join(plan.problems))
    console.print("[green]ready to run[/]: drop --dry-run.")
