"""CLI commands of the core: schemes, inspect, convert, export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

from symconvert.cli.app import app, console, err_console
from symconvert.io.metadata import TRUST_CODE_HELP
from symconvert.surgery.calib_solve import DEFAULT_DAMP

MODEL_HELP = (
    "timm:NAME, torchvision:NAME, hf-hub:ORG/NAME, py:package.module:function, or a bare "
    "NAME (looked up in timm, then torchvision)."
)



def _load_model(model: str, pretrained: bool, weights: Path | None, num_classes: int | None,
                model_kwargs: list[str] | None = None):
    from symconvert.models.sources import create_model, parse_model

    library, name = parse_model(model)
    if ":" not in model or model.split(":", 1)[0] not in ("timm", "torchvision", "py", "hf-hub"):
        err_console.print(f"resolved [bold]{model}[/] → [bold]{library}:{name}[/]")
    return create_model(model, pretrained=pretrained, weights=weights, num_classes=num_classes,
                        **parse_kwargs(model_kwargs or []))


def parse_kwargs(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs, values read as YAML (``hidden=256``, ``tied=true``)."""
    import yaml

    from symconvert.errors import SymconvertError
    from symconvert.io.metadata import SourceRecord

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SymconvertError(f"--model-kwarg {item!r}: expected KEY=VALUE, e.g. vocab_size=10000")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise SymconvertError(f"--model-kwarg {item!r}: the value is not valid YAML "
                                  f"({str(exc).splitlines()[0]})") from None
    # what a model directory may record (plain JSON values, no file-reading keys): a
    # kwarg that could not be recorded would make the written directory unloadable
    from pydantic import ValidationError

    try:
        SourceRecord(library="timm", name="x", kwargs=out)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise SymconvertError(f"--model-kwarg: {err['msg']} ({'.'.join(map(str, err['loc']))}); "
                              "pass weights with --weights FILE.") from None
    return out


_MODEL_KWARG_HELP = "Keyword argument for the model builder, KEY=VALUE (repeatable; recorded for load)."


def _config(scheme, **flags):
    """The ConvertConfig of the convert/inspect flags (empty repeatables: no filter)."""
    from symconvert.surgery.config import ConvertConfig

    for key in ("include", "exclude"):
        flags[key] = flags.get(key) or None
    return ConvertConfig.of(scheme, **flags)


@app.command("schemes")
def schemes_command(
    fmt: str = typer.Option("table", "--format", help="table or json"),
) -> None:
    """List the symmetry schemes: name, paper name, definition, layers, free fraction.

    Examples:

      symconvert schemes

      symconvert schemes --format json
    """
    from symconvert.checks import check_number_args
    from symconvert.report.tables import schemes_table
    from symconvert.schemes import list_schemes

    check_number_args(fmt=fmt, formats=("table", "json"))

    schemes = list_schemes()
    if fmt == "json":
        print(json.dumps([{"name": s.spec, "paper_name": s.paper_name, "definition": s.definition,
                           "layers": s.layers, "free_fraction": s.fraction} for s in schemes], indent=2))
        return
    console.print(schemes_table(schemes))


_SCHEME_HELP = ("Symmetry scheme (see `symconvert schemes`): channel, spatial, channel+spatial, block, …, "
                "or auto (per layer the cheapest scheme or none; needs --target-reduction).")
_SCHEMES_HELP = ("With --scheme auto: the candidate schemes, comma-separated (default "
                 "channel,block,spatial,channel+spatial,quarter; e.g. channel,block,eigen:16).")
DTYPE_HELP = ("Storage precision of the written tensors: float32, bfloat16 or float16 (half "
              "the bytes; `load` computes in float32).")

_CALIBRATE_HELP = ("Calibration data (any --data spec; its train split): fit every converted layer to "
                   "the source layer's output on real inputs and re-estimate BatchNorm statistics, "
                   "so the model works before fine-tuning. With --target-reduction, layers are "
                   "ranked by this calibrated output error.")


# The convert/inspect options, defined once (ConvertConfig's fields and the model's).
_INCLUDE = typer.Option([], "--include", help="Only layers whose name matches (glob, or re:REGEX). Repeatable.")
_EXCLUDE = typer.Option([], "--exclude", help="Skip layers whose name matches (glob, or re:REGEX). Repeatable.")
_LAYERS = typer.Option(None, "--layers", help="Layer kinds to consider: conv,linear,rnn (default all).")
_MIN_CHANNELS = typer.Option(0, "--min-channels", help="Skip layers with fewer channels.")
_INCLUDE_HEAD = typer.Option(False, "--include-head", help="Also convert the classifier head.")
_GATES = typer.Option(None, "--gates", help="RNN weights: hh (default) or hh,ih.")
_TARGET_REDUCTION = typer.Option(None, "--target-reduction", help="Convert the cheapest layers until the model is this fraction smaller (e.g. 0.25).")
_SCHEMES = typer.Option(None, "--schemes", help=_SCHEMES_HELP)
_CALIBRATE = typer.Option(None, "--calibrate", help=_CALIBRATE_HELP)
_CALIBRATION_SAMPLES = typer.Option(512, "--calibration-samples", help="Number of calibration inputs (drawn from the train split, seeded).")
_CALIBRATION_DAMP = typer.Option(DEFAULT_DAMP, "--calibration-damp", help="Pull of each calibrated fit towards the nearest symmetric weight, relative to the layer's mean input energy; keeps the fit from over-fitting its samples (0: plain least squares).")
_WEIGHTS = typer.Option(None, "--weights", help="Local .safetensors/.pth weights instead of the pretrained download.")
_NUM_CLASSES = typer.Option(None, "--num-classes", help="Replace the classifier head with N classes.")
_MODEL_KWARG = typer.Option([], "--model-kwarg", help=_MODEL_KWARG_HELP)


@dataclasses.dataclass
class _Shared:
    """The flags inspect and convert share, in their --help order after --pretrained: the
    model's (--weights, --num-classes, --model-kwarg) and the first selection flags."""

    weights: Path | None = dataclasses.field(metadata={"option": _WEIGHTS})
    num_classes: int | None = dataclasses.field(metadata={"option": _NUM_CLASSES})
    model_kwarg: list[str] = dataclasses.field(metadata={"option": _MODEL_KWARG})
    include: list[str] = dataclasses.field(metadata={"option": _INCLUDE})
    exclude: list[str] = dataclasses.field(metadata={"option": _EXCLUDE})
    layers: str | None = dataclasses.field(metadata={"option": _LAYERS})
    min_channels: int = dataclasses.field(metadata={"option": _MIN_CHANNELS})
    include_head: bool = dataclasses.field(metadata={"option": _INCLUDE_HEAD})

    def check(self, fmt: str, calibration_samples: int, calibration_damp: float) -> None:
        """The numeric flags (and --format) checked before anything is created."""
        from symconvert.checks import check_number_args

        check_number_args(num_classes=self.num_classes, min_channels=self.min_channels,
                          fmt=fmt, calibration_samples=calibration_samples,
                          calibration_damp=calibration_damp, formats=("table", "json"))

    def load(self, model: str, pretrained: bool):
        return _load_model(model, pretrained, self.weights, self.num_classes, self.model_kwarg)

    def config(self, scheme, **flags):
        """The ConvertConfig of these flags and the command's own (``flags``)."""
        return _config(scheme, include=self.include, exclude=self.exclude, layers=self.layers,
                       min_channels=self.min_channels, include_head=self.include_head, **flags)


def _shared_options(func):
    """Typer sees the flags of ``_Shared`` in place of ``func``'s ``shared`` parameter
    (same order, types and help as if written there); ``func`` gets them as one ``_Shared``."""
    import functools
    import inspect
    import typing

    hints = typing.get_type_hints(_Shared)
    names = [f.name for f in dataclasses.fields(_Shared)]
    params: list[inspect.Parameter] = []
    for p in inspect.signature(func, eval_str=True).parameters.values():
        if p.name != "shared":
            params.append(p)
            continue
        params += [inspect.Parameter(f.name, p.kind, default=f.metadata["option"],
                                     annotation=hints[f.name])
                   for f in dataclasses.fields(_Shared)]

    @functools.wraps(func)
    def command(**kwargs):
        shared = _Shared(**{name: kwargs.pop(name) for name in names})
        return func(shared=shared, **kwargs)

    command.__signature__ = inspect.Signature(params, return_annotation=None)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


@app.command("inspect")
@_shared_options
def inspect_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    scheme: str | None = typer.Option(None, "--scheme", "-s", help=_SCHEME_HELP + " Without it: a summary of every scheme."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="Load pretrained weights (needed for the symmetrisation error)."),
    shared: _Shared = None,  # --weights … --include-head (_shared_options)
    gates: str | None = _GATES,
    target_reduction: float | None = _TARGET_REDUCTION,
    schemes: str | None = _SCHEMES,
    fmt: str = typer.Option("table", "--format", help="table or json"),
    all_layers: bool = typer.Option(False, "--all", help="Show every skipped layer too (table)."),
    calibrate: str | None = _CALIBRATE,
    calibration_samples: int = _CALIBRATION_SAMPLES,
    calibration_damp: float = _CALIBRATION_DAMP,
) -> None:
    """Dry run: every candidate layer, eligible or skipped with the reason, params
    before/after and symmetrisation error, with totals. Writes nothing.

    Examples:

      symconvert inspect timm:resnet50 --scheme channel --no-pretrained

      symconvert inspect timm:vit_small_patch16_224 --scheme block --no-pretrained

      symconvert inspect torchvision:resnet18 --no-pretrained      # all schemes

      symconvert inspect torchvision:resnet50 --scheme auto --target-reduction 0.4   # per layer: chosen scheme, alternatives' costs

      symconvert inspect timm:quickstart_digits --scheme channel --calibrate digits
    """
    import symconvert

    shared.check(fmt, calibration_samples, calibration_damp)
    m = shared.load(model, pretrained)
    config = shared.config(scheme, gates=gates, allow_empty=True,
                           target_reduction=target_reduction, schemes=schemes,
                           calibrate=calibrate, calibration_samples=calibration_samples,
                           calibration_damp=calibration_damp)
    if scheme is None:
        _inspect_every_scheme(model, m, config, fmt)
        return
    if calibrate is not None:
        import copy

        # the data-aware error: calibrate a copy, the plan reports both output errors
        _, plan = symconvert.convert(copy.deepcopy(m), config)
    else:
        plan = symconvert.inspect(m, config)
    if fmt == "json":
        print(json.dumps(plan.to_dict(), indent=2))
        return
    for w in plan.warnings:
        err_console.print(f"[yellow]warning:[/] {w}")
    console.print(_table(plan, f"{model} — {plan.scheme} (dry run)", show_skipped=True,
                         max_rows=None if all_layers else 200))
    console.print(_totals(plan))
    if not plan.converted:
        console.print("[yellow]nothing would be converted[/] — see the reasons above.")


@app.command("convert")
@_shared_options
def convert_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    scheme: str = typer.Option(..., "--scheme", "-s", help=_SCHEME_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (default: ./<model>-<scheme>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a model already in --out."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="Load pretrained weights."),
    shared: _Shared = None,  # --weights … --include-head (_shared_options)
    allow_empty: bool = typer.Option(False, "--allow-empty", help="Write the model even if nothing is converted."),
    gates: str | None = _GATES,
    target_reduction: float | None = _TARGET_REDUCTION,
    schemes: str | None = _SCHEMES,
    fmt: str = typer.Option("table", "--format", help="table or json (the plan)"),
    dtype: str = typer.Option("float32", "--dtype", help=DTYPE_HELP),
    calibrate: str | None = _CALIBRATE,
    calibration_samples: int = _CALIBRATION_SAMPLES,
    calibration_damp: float = _CALIBRATION_DAMP,
) -> None:
    """Convert MODEL: replace every eligible layer by its symmetric equivalent (initialised
    from the nearest symmetric weight) and write the converted-model directory.

    Examples:

      symconvert convert torchvision:resnet101 --scheme channel --out r101-channel

      symconvert convert timm:resnet50 --scheme channel --target-reduction 0.2

      symconvert convert timm:convnext_atto --scheme auto --target-reduction 0.4

      symconvert convert timm:resnet50 --scheme auto --target-reduction 0.4 --schemes channel,block,eigen:32

      symconvert convert my.pth --weights my.pth ...   # see --weights

      symconvert convert timm:vit_small_patch16_224 --scheme block --exclude 're:blocks\\.(0|1)\\.'

      symconvert convert timm:resnet50 --scheme channel --dtype bfloat16   # half the bytes

      symconvert convert timm:quickstart_digits --scheme channel --calibrate digits
    """
    import symconvert
    from symconvert.io.checkpoint import check_writable
    from symconvert.io.files import output_dir, refuse_inputs

    out = out or Path(f"{model.split(':')[-1].replace('/', '_')}-{scheme.replace(':', '').replace('+', '_')}")
    shared.check(fmt, calibration_samples, calibration_damp)
    refuse_inputs(out, [shared.weights])
    check_writable(out, overwrite=overwrite)
    from symconvert.io.export_packed import parse_dtype

    parse_dtype(dtype)  # a bad --dtype fails before any work
    m = shared.load(model, pretrained)
    config = shared.config(scheme, gates=gates, allow_empty=allow_empty,
                           target_reduction=target_reduction, schemes=schemes,
                           calibrate=calibrate, calibration_samples=calibration_samples,
                           calibration_damp=calibration_damp)
    m, plan = symconvert.convert(m, config)
    extra = _convert_record(model, pretrained, shared, config, plan)
    # a model directory is all or nothing: a failure (Ctrl-C included) removes what this
    # run wrote; the lock makes a concurrent convert into the same --out exit 2
    with output_dir(out, inputs=[shared.weights], keep_partial=False):
        check_writable(out, overwrite=overwrite)  # again, under the lock
        symconvert.save(m, out, extra_metadata=extra, overwrite=overwrite, dtype=dtype)
        write_plan(out, plan)
    _print_converted(plan, model, out, fmt)


def _inspect_every_scheme(model: str, m, config, fmt: str) -> None:
    """``inspect`` without --scheme: one row per scheme (the selection flags apply)."""
    from rich.table import Table

    import symconvert
    from symconvert.schemes import list_schemes

    table = Table(title=f"{model}: every scheme")
    for col in ("scheme", "converted", "params after", "saved"):
        table.add_column(col, justify="right" if col != "scheme" else "left")
    rows = []
    for s in list_schemes():
        plan = symconvert.inspect(m, dataclasses.replace(
            config, scheme=s, target_reduction=None, schemes=None, calibrate=None))
        rows.append({"scheme": s.spec, "converted": len(plan.converted),
                     "params_before": plan.total_before, "params_after": plan.total_after,
                     "saved_fraction": plan.saved_fraction})
        table.add_row(s.spec, str(len(plan.converted)), f"{plan.total_after:,}", f"{plan.saved_fraction:.2%}")
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    else:
        console.print(table)
        console.print("Pass --scheme S for the per-layer plan.")


def _convert_record(model: str, pretrained: bool, shared: _Shared, config, plan) -> dict:
    """What ``convert`` records in the directory's metadata: its arguments (``convert``) and,
    calibrated, the calibration (``calibration``)."""
    args = {"model": model, "pretrained": pretrained, "model_kwargs": shared.model_kwarg,
            "weights": str(shared.weights) if shared.weights else None,
            "num_classes": shared.num_classes, **config.to_record(),
            **({"schemes": plan.schemes}
               if config.schemes is not None or config.scheme == "auto" else {})}
    extra = {"convert": args}
    if config.calibrate is not None:
        from symconvert.surgery.calibrate import calibration_record

        extra["calibration"] = calibration_record(plan)
    return extra


def _print_converted(plan, model: str, out: Path, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(plan.to_dict(), indent=2))
        return
    for w in plan.warnings:
        err_console.print(f"[yellow]warning:[/] {w}")
    console.print(_table(plan, f"{model} — {plan.scheme}", show_skipped=False))
    console.print(_totals(plan))
    size = (out / "model.safetensors").stat().st_size
    console.print(f"wrote [bold]{out}[/] (model.safetensors: {size:,} bytes)")


def _table(plan, title: str, show_skipped: bool, max_rows: int | None = None):
    """The plan table: per layer its own scheme and the alternatives for --scheme auto."""
    from symconvert.report.tables import plan_table
    from symconvert.surgery.auto import AutoPlan, auto_table

    if isinstance(plan, AutoPlan):
        return auto_table(plan, title, show_skipped=show_skipped, max_rows=max_rows)
    return plan_table(plan, title, show_skipped=show_skipped, max_rows=max_rows)


def _totals(plan) -> str:
    from symconvert.report.tables import totals_line
    from symconvert.surgery.auto import AutoPlan, auto_totals

    return auto_totals(plan) if isinstance(plan, AutoPlan) else totals_line(plan)


def write_plan(out: Path, plan) -> None:
    from symconvert.io.files import atomic_write_text

    atomic_write_text(Path(out) / "plan.json", json.dumps(plan.to_dict(), indent=2) + "\n")


@app.command("export")
def export_command(
    directory: Path = typer.Argument(..., help="A converted (or fine-tuned) model directory."),
    fmt: str = typer.Option("dense", "--format", help="dense (safetensors), onnx or torchscript."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    packed: bool = typer.Option(False, "--packed", help="onnx/torchscript: store only the free parameters and rebuild each dense weight in the graph (about the size of the model directory; onnxruntime folds it at session creation)."),
    dtype: str = typer.Option("float32", "--dtype", help=DTYPE_HELP + " In onnx/torchscript the graph casts to float32."),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP),
) -> None:
    """Fold the symmetry back into plain dense weights of the ORIGINAL architecture and
    write them: `dense` is a safetensors state_dict loadable by plain timm/torchvision;
    `onnx`/`torchscript` with `--packed` keep the file as small as the model directory.

    Examples:

      symconvert export r101-channel --format dense --out r101-dense.safetensors

      symconvert export r101-channel --format onnx --out r101.onnx

      symconvert export r101-channel --format onnx --packed --out r101-packed.onnx

      symconvert export r101-channel --format torchscript --packed --dtype float16 --out r101.pt
    """
    import symconvert
    from symconvert.io.checkpoint import META_NAME, WEIGHTS_NAME
    from symconvert.io.export import FORMATS, export
    from symconvert.io.export_packed import parse_dtype
    from symconvert.io.files import check_output_file, refuse_inputs

    if fmt not in FORMATS:
        from symconvert.errors import SymconvertError

        raise SymconvertError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}.")
    parse_dtype(dtype)  # a bad --dtype fails before loading
    # an --out that is the model being exported is refused even with --overwrite
    refuse_inputs(out, [directory, directory / WEIGHTS_NAME, directory / META_NAME])
    if out.absolute().parent.is_dir():  # export creates a missing folder itself
        check_output_file(out, overwrite=overwrite)
    model = symconvert.load(directory, trust_code=trust_code)
    path = export(model, fmt, out, overwrite=overwrite, packed=packed, dtype=dtype)
    kind = f"{fmt}{', packed' if packed else ''}, {dtype}"
    console.print(f"wrote [bold]{path}[/] ({path.stat().st_size:,} bytes, {kind})")
