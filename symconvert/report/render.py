"""The report as text (SPEC §7): ``sections(report)`` turns the dict ``build_report`` returns
into titled tables of already-formatted strings; ``render_table`` (rich), ``render_markdown``
and ``render_text`` lay them out and ``render_json`` dumps the dict. Every number passes through
the ``fmt_*`` helpers here, so the formats cannot disagree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from symconvert.errors import SymconvertError
from symconvert.io.export import EXPORTS
from symconvert.report.deployment import deployable_keys
from symconvert.report.options import COMPARE_KINDS
from symconvert.tasks import Task, get_task, task_for_scores

FORMATS = ("table", "json", "markdown")

Report = dict[str, Any]


# ------------------------------------------------------------------- sentences


def compare_sentence(compare: dict[str, Any], task: Task | None = None) -> str:
    """One sentence: which won at the same parameter budget and by how much. A percentage
    metric (top-1) is compared in points, any other (perplexity) by its ratio."""
    task = task or _task(compare.get("task"), compare.get("symmetric"))
    metric = task.metric
    sym = compare["symmetric"]
    if metric.key not in sym:
        return f"The symmetric model has no {metric.label} to compare."
    parts = (_points_sentence if metric.percent else _ratio_sentence)(compare, task)
    text = "; ".join(parts)
    return (text[0].upper() + text[1:] + ".") if text else ""


def _points_sentence(compare: dict[str, Any], task: Task) -> list[str]:
    metric, sym, n = task.metric, compare["symmetric"], compare.get("n")
    key, label, fmt = metric.key, metric.label, metric.format
    parts = []

    def items(diff_pt: float) -> str:
        # on a small eval split a point is a handful of items: say how many
        return f" = {round(abs(diff_pt) * n / 100)} of {n:,} {task.items}" if n else ""

    if key in (compare.get("prune") or {}):
        diff = (sym[key] - compare["prune"][key]) * 100
        verdict = ("symmetry wins" if diff > 0 else "pruning wins" if diff < 0 else "a tie")
        margin = f" by {abs(diff):.2f} pt{items(diff)}" if diff else ""
        parts.append(
            f"with {compare['removed']:,} parameters removed from each, {sym['label']} reaches "
            f"{fmt(sym[key])} {label} and magnitude pruning {fmt(compare['prune'][key])}"
            f" ({verdict}{margin}), but only the symmetric file is smaller "
            f"({sym['bytes']:,} vs {compare['prune']['bytes']:,} bytes)")
    peers = [k for k in ("structured", "lowrank") if key in (compare.get(k) or {})]
    if peers and not parts:
        parts.append(f"with {compare['removed']:,} parameters removed from each, {sym['label']} "
                     f"reaches {fmt(sym[key])} {label} in {sym['bytes']:,} bytes")
    for kind, what in (("structured", "structured pruning"), ("lowrank", "low-rank SVD")):
        other = compare.get(kind) or {}
        if key in other:
            diff = (sym[key] - other[key]) * 100
            verdict = ("symmetry wins" if diff > 0 else f"{what} wins" if diff < 0 else "a tie")
            margin = f" by {abs(diff):.2f} pt{items(diff)}" if diff else ""
            parts.append(f"{what} reaches {fmt(other[key])} ({verdict}{margin}) in "
                         f"{other['bytes']:,} bytes")
    if key in (compare.get("dense") or {}):
        diff = (compare["dense"][key] - sym[key]) * 100
        cost = (f"symmetry costs {diff:.2f} pt{items(diff)}" if diff > 0 else
                f"symmetry is {-diff:.2f} pt ahead{items(diff)}" if diff < 0 else
                "no difference")
        parts.append(f"the dense control fine-tuned with the same budget reaches "
                     f"{fmt(compare['dense'][key])} ({cost})")
    return parts


def _ratio_sentence(compare: dict[str, Any], task: Task) -> list[str]:
    metric, sym = task.metric, compare["symmetric"]
    parts = []
    for kind, what in (("structured", "structured pruning at the same parameter count"),
                       ("lowrank", "low-rank SVD at the same parameter count"),
                       ("prune", "magnitude pruning at the same parameter count"),
                       ("dense", "the dense control fine-tuned with the same budget")):
        other = (compare.get(kind) or {}).get(metric.key)
        if other is None:
            continue
        ratio = sym[metric.key] / other - 1
        parts.append(f"{what} reaches {metric.label} {metric.format(other)} against "
                     f"{metric.format(sym[metric.key])} for {sym['label']} ({ratio:+.1%})")
    return parts


def _task(name: str | None, scores: dict[str, Any] | None = None) -> Task:
    """The report's task: by name, or (a report built by hand) by the scores it holds."""
    return get_task(name) if name else task_for_scores(scores)


def report_task(report: Report) -> Task:
    """The task a report was measured for (``report["task"]``)."""
    acc = report.get("accuracy") or {}
    measured = next((acc[k] for k in ("source", "converted", "finetuned")
                     if isinstance(acc.get(k), dict) and "reason" not in acc[k]), None)
    return _task(report.get("task"), measured)


# ------------------------------------------------------------------------ rendering


def fmt_int(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.2f} %"


def fmt_ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f} ms"


def fmt_err(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


@dataclass
class Section:
    """One titled table of already-formatted cells; the renderers only lay it out."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    right: list[bool] = field(default_factory=list)  # right-justify column i
    note: str | None = None


def _score_cells(entry: dict[str, Any] | None, task: Task) -> list[str]:
    """The task's scores of one model, then a note (why it was not measured)."""
    if not entry or "reason" in entry:
        reason = (entry or {}).get("reason", "not measured")
        return ["—"] * len(task.score_metrics) + [f"not measured: {reason}"]
    return [m.format(entry.get(m.key)) for m in task.score_metrics] + [""]


def sections(report: Report) -> list[Section]:
    """The report as tables of strings: what ``render_table`` and ``render_markdown`` show."""
    task = report_task(report)
    out = [_summary_section(report), _accuracy_section(report["accuracy"], task)]
    if report.get("compare"):
        out.append(_compare_section(report["compare"], task))
    if report.get("deployment"):
        out.append(_deployment_section(report["deployment"]))
    out.append(_layers_section(report))
    out.append(_provenance_section(report))
    return out


def _summary_section(report: Report) -> Section:
    """Parameters, bytes, FLOPs and latency, source against symmetric."""
    p, b, f, lat = report["params"], report["bytes"], report["flops"], report["latency"]
    notes = ["bytes: dense = the folded export (`symconvert export --format dense`)."]
    if "reason" in lat:
        notes.append(f"latency not measured: {lat['reason']}.")
    else:
        notes.append(f"latency: median of {lat.get('runs')} runs, the symmetric model folded; "
                     f"unfolded it takes {fmt_ms(lat['converted_ms'])}.")
    if "reason" in f:
        notes.append(f"FLOPs not counted: {f['reason']}.")
    return Section(
        title=f"{report['model']} — {report['scheme']} ({report['kind']})",
        columns=["quantity", "source / dense", "symmetric", "change"],
        right=[False, True, True, True],
        rows=[
            ["parameters", fmt_int(p["before"]), fmt_int(p["after"]),
             f"−{fmt_int(p['saved'])} (−{fmt_pct(p['saved_fraction'])})"],
            ["bytes on disk", fmt_int(b["dense"]), fmt_int(b["symconvert"]),
             f"−{fmt_pct(b['saved_fraction'])}"],
            ["FLOPs per input", fmt_int(f.get("source")), fmt_int(f.get("folded")),
             fmt_ratio(f["folded"] / f["source"] if f.get("source") else None)],
            [f"latency, batch {lat['batch']} ({lat['device']})", fmt_ms(lat.get("source_ms")),
             fmt_ms(lat.get("folded_ms")), fmt_ratio(lat.get("folded_vs_source"))],
            *_fast_rows(f, report.get("fast_latency") or {}),
        ],
        note=" ".join(notes),
    )


def _fast_rows(f: dict[str, Any], lat: dict[str, Any]) -> list[list[str]]:
    """FLOPs and latency of the fast forms (issue 23): after the dense rows."""
    rows = []
    if f.get("fast") is not None:
        rows.append(["FLOPs per input, fast forms", fmt_int(f.get("source")), fmt_int(f["fast"]),
                     fmt_ratio(f.get("fast_vs_source"))])
    for key, value in lat.items():
        if key.startswith("batch_"):
            rows.append([f"latency fast vs dense, batch {key[6:]} ({lat['device']})",
                         fmt_ms(value["dense_ms"]), fmt_ms(value["fast_ms"]),
                         fmt_ratio(value["fast_vs_dense"])])
    return rows


_MODELS = (("source", "source"), ("converted", "converted, before fine-tuning"),
           ("calibrated", "converted, calibrated"), ("finetuned", "fine-tuned"))


def _accuracy_section(acc: dict[str, Any], task: Task) -> Section:
    """The task's scores (top-1/top-5, perplexity) of every model measured."""
    columns = ["model", *(m.label for m in task.score_metrics), "note"]
    right = [False, *([True] * len(task.score_metrics)), False]
    if "reason" in acc and not any(k in acc for k in ("source", "converted", "finetuned")):
        return Section(title=task.score_title, columns=columns, right=right,
                       rows=[[m, *_score_cells({"reason": acc["reason"]}, task)]
                             for m in ("source", "converted", "fine-tuned")])
    return Section(
        title=f"{task.score_title} on the {acc.get('split')} split "
              f"({task.describe_n(acc.get('n'))})",
        columns=columns, right=right,
        rows=[[label, *_score_cells(acc.get(key), task)] for key, label in _MODELS])


def _compare_row(e: dict[str, Any], task: Task, shown: list[Any]) -> list[str]:
    if "reason" in e:  # the method cannot reach the budget on this model
        return [e["label"], *(["—"] * (6 + len(shown)))]
    before = e.get("before_finetune") or {}
    return [e["label"], fmt_int(e.get("params_stored")), fmt_int(e.get("params_nonzero")),
            fmt_int(e.get("bytes")), task.metric.format(before.get(task.metric.key)),
            *(m.format(e.get(m.key)) for m in shown), fmt_int(e.get("flops")),
            fmt_ratio(e.get("latency_vs_source"))]


def _compare_note(label: str, e: dict[str, Any]) -> str:
    text = f"{label[0].upper()}{label[1:]}: "
    if "reason" in e:
        return text + f"cannot reach the budget: {e['reason']}."
    if "difference" in e:
        text += (f"removes {fmt_int(e['removed'])} parameters ({fmt_int(e['difference'])} "
                 f"short of the budget, one more step would remove {fmt_int(e['step'])}); ")
    return text + f"{e['note']}."


def _compare_section(cmp_: dict[str, Any], task: Task) -> Section:
    """``--compare``: the symmetric model and the baselines side by side."""
    shown = task.score_metrics if task.metric.percent else task.score_metrics[:1]
    rows = [_compare_row(cmp_[key], task, shown) for key in ("symmetric", *COMPARE_KINDS)
            if cmp_.get(key)]
    budget = cmp_["budget"]
    budget_text = (f"Budget: {budget['epochs']} epoch(s) on {budget['data']}, distillation "
                   f"{'on' if budget['distill'] else 'off'}, seed {budget['seed']}"
                   if budget.get("fine_tuned") else f"Budget: {budget['note']}")
    notes = [cmp_["summary"], budget_text + ".",
             "Latency: median forward time over the source's, each timed interleaved with "
             "the source."] + [_compare_note(cmp_[k]["label"], cmp_[k])
                               for k in COMPARE_KINDS if k in cmp_]
    columns = ["model", "params stored", "params non-zero", "file bytes",
               f"{task.metric.label} before FT", *(m.label for m in shown), "FLOPs",
               "latency vs source"]
    return Section(
        title=f"side by side, {fmt_int(cmp_['removed'])} parameters removed",
        columns=columns, right=[False] + [True] * (len(columns) - 1), rows=rows,
        note=" ".join(notes))


def _layers_section(report: Report) -> Section:
    """One row per converted layer: shape, scheme, parameters and errors."""
    per_layer = (report.get("flops") or {}).get("per_layer") or {}
    layer_rows = [[e["name"], "×".join(str(s) for s in e["shape"]), e["scheme"],
                   fmt_int(e["params_before"]), fmt_int(e["params_after"]),
                   fmt_err(e["symmetrization_error"]), fmt_err(e.get("output_error")),
                   *(fmt_int(v) for v in per_layer.get(e["name"], [None, None]))]
                  for e in report["layers"]]
    return Section(
        title=f"per layer ({len(layer_rows)} converted)",
        columns=["layer", "shape", "scheme", "params before", "params after", "sym. error",
                 "output error", "FLOPs before", "FLOPs after"],
        right=[False, False, False, True, True, True, True, True, True], rows=layer_rows,
        note="sym. error = ‖W − unpack(pack(W))‖ / ‖W‖ on the source weights; output error = "
             "relative error of the layer's output on the calibration data after the "
             "least-squares fit (convert --calibrate; — without); FLOPs before/after: "
             "torch's flop counter on the source layer and on what the converted layer runs "
             "(its fast form, where it has one); rows from "
             f"{report.get('layers_from')}.")


def _provenance_section(report: Report) -> Section:
    """Where the numbers come from: directory, data, device, versions, arguments."""
    prov = report["provenance"]
    v = prov["versions"]
    return Section(
        title="provenance", columns=["", ""], right=[False, False],
        rows=[
            ["directory", report["directory"]],
            ["data", f"{prov['data'] or '—'} (split {prov['split'] or '—'}, "
                     f"n = {fmt_int(prov['n'])})"],
            ["device", prov["device"]],
            ["versions", ", ".join(f"{k} {v[k]}" for k in v)],
            ["convert", _args_text(prov.get("convert"))],
            ["finetune", _args_text(prov.get("finetune"))],
            ["parent", prov.get("parent") or "—"],
        ])


def _deployment_labels() -> dict[str, str]:
    labels = {"symconvert": "symconvert directory"}
    for key, fmt, packed in deployable_keys():
        labels[key] = f"{EXPORTS[fmt].label}, {'--packed' if packed else 'dense'}"
    return labels


def _deployment_section(dep: dict[str, Any]) -> Section:
    dtypes = list(dep.get("by_dtype", {}))
    rows = []
    for key, label in _deployment_labels().items():
        by = {d: dep["by_dtype"][d].get("dense" if key.startswith("dense") else key)
              for d in dtypes}
        measured = fmt_int(dep.get(key)) if key in dep else \
            f"— ({dep.get('reasons', {}).get(key, 'not written')})"
        rows.append([label, measured, *[fmt_int(by[d]) for d in dtypes]])
    return Section(
        title="deployment: bytes of what you ship",
        columns=["format", f"file bytes ({dep.get('stored_dtype', 'float32')})",
                 *[f"tensors, {d}" for d in dtypes]],
        right=[False, True, *[True] * len(dtypes)], rows=rows,
        note=(f"file bytes: written and measured (`symconvert export --format F [--packed]`); "
              f"tensors: what each format stores per --dtype, packed ones including "
              f"{fmt_int(dep.get('index_bytes'))} bytes of int32 index tables; a dense ONNX "
              "file is smaller by the BatchNorms the exporter folds."))


def _args_text(args: dict[str, Any] | None) -> str:
    if not args:
        return "—"
    return " ".join(f"{k}={json.dumps(v)}" for k, v in args.items() if v not in (None, [], {}))


def render_json(report: Report) -> str:
    return json.dumps(report, indent=2, default=str)


def render_markdown(report: Report) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# symconvert report: {cell(report['model'])}", ""]
    for sec in sections(report):
        lines += [f"## {cell(sec.title)}", ""]
        lines.append("| " + " | ".join(cell(c) or " " for c in sec.columns) + " |")
        lines.append("|" + "|".join("---:" if (sec.right[i] if i < len(sec.right) else False)
                                    else "---" for i in range(len(sec.columns))) + "|")
        for row in sec.rows:
            lines.append("| " + " | ".join(cell(c) for c in row) + " |")
        if sec.note:
            lines += ["", cell(sec.note)]
        lines.append("")
    return "\n".join(lines)


def render_table(report: Report) -> list[Any]:
    """rich renderables (one Table per section) for ``console.print(*render_table(r))``."""
    out: list[Any] = [Text(f"symconvert report: {report['model']}", style="bold")]
    for sec in sections(report):
        table = Table(title=escape(sec.title), title_justify="left", show_header=any(sec.columns))
        for i, col in enumerate(sec.columns):
            table.add_column(escape(col), justify="right" if (sec.right[i] if i < len(
                sec.right) else False) else "left", overflow="fold")
        for row in sec.rows:
            table.add_row(*(escape(c) for c in row))
        out.append(table)
        if sec.note:
            out.append(Text(sec.note, style="dim"))
    return out


def render_text(report: Report, width: int = 160) -> str:
    """The rich table as plain text (for ``--out FILE`` and tests)."""
    console = Console(width=width, record=True, file=open(os.devnull, "w"),  # noqa: SIM115
                      color_system=None)
    for item in render_table(report):
        console.print(item)
    text = console.export_text()
    console.file.close()
    return text


def render(report: Report, fmt: str) -> str:
    if fmt not in FORMATS:
        raise SymconvertError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}.")
    if fmt == "json":
        return render_json(report)
    if fmt == "markdown":
        return render_markdown(report)
    return render_text(report)


__all__ = ["FORMATS", "Report", "Section", "compare_sentence", "fmt_err", "fmt_int", "fmt_ms",
           "fmt_pct", "fmt_ratio", "render", "render_json", "render_markdown", "render_table",
           "render_text", "report_task", "sections"]
