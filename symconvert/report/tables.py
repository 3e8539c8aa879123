"""rich renderings of plans and scheme tables (shared by the CLI commands and the report)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from symconvert.surgery.plan import Plan


def fmt_int(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def fmt_err(e: float | None) -> str:
    return "—" if e is None else f"{e:.3f}"


def schemes_table(schemes) -> Table:
    table = Table(title="symmetry schemes", show_lines=False)
    for col in ("name", "paper", "definition", "layers", "free fraction", "e.g. 64×64×3×3"):
        table.add_column(col, overflow="fold")
    for s in schemes:
        shape = (64, 64, 3, 3)
        example = "—" if s.check(shape) else f"{s.free_count(shape) / (64 * 64 * 9):.3f}"
        table.add_row(*(escape(str(c)) for c in (s.spec, s.paper_name, s.definition, s.layers, s.fraction, example)))
    return table


def plan_table(plan: Plan, title: str, show_skipped: bool = True, max_rows: int | None = None) -> Table:
    table = Table(title=title, show_lines=False)
    # data-aware errors (convert/inspect --calibrate): naive and calibrated output error
    calibrated = any(e.output_error is not None for e in plan.layers)
    extra = (("out. error naive", "right"), ("out. error calib.", "right")) if calibrated else ()
    for col, just in (("layer", "left"), ("type", "left"), ("shape", "left"), ("action", "left"),
                      ("params before", "right"), ("params after", "right"),
                      ("sym. error", "right"), *extra, ("reason / note", "left")):
        table.add_column(col, justify=just, overflow="fold")
    rows = [e for e in plan.layers if show_skipped or e.converted]
    shown = rows if max_rows is None else rows[:max_rows]
    for e in shown:
        shape = "×".join(str(s) for s in e.shape) + (f" g={e.groups}" if e.groups != 1 else "")
        note = e.reason or e.note or ""
        if e.aliases:
            note = (note + " " if note else "") + f"tied with {', '.join(e.aliases)}"
        action = "[green]convert[/]" if e.converted else "[dim]skip[/]"
        cells = [fmt_err(e.output_error_naive), fmt_err(e.output_error)] if calibrated else []
        table.add_row(escape(e.name), e.layer_type, shape, action, fmt_int(e.params_before),
                      fmt_int(e.params_after), fmt_err(e.symmetrization_error), *cells, escape(note))
    if max_rows is not None and len(rows) > max_rows:
        table.add_row(f"… {len(rows) - max_rows} more", *([""] * (len(table.columns) - 1)))
    return table


def totals_line(plan: Plan) -> str:
    return (
        f"[bold]{plan.scheme}[/]: {len(plan.converted)} layers converted, "
        f"{len(plan.skipped)} skipped; parameters {plan.total_before:,} → {plan.total_after:,} "
        f"([bold green]−{plan.saved_fraction:.2%}[/])"
    )
