"""rich renderings of plans and scheme tables (shared by the CLI commands and the report)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from symconvert.surgery.auto import AutoPlan
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
    """Per layer: action, parameters, errors, reason; for ``--scheme auto`` (``AutoPlan``)
    each layer's own scheme and the alternatives' costs (``auto_table``)."""
    if isinstance(plan, AutoPlan):
        return auto_table(plan, title, show_skipped=show_skipped, max_rows=max_rows)
    table = Table(title=title, show_lines=False)
    # data-aware errors (convert/inspect --calibrate): naive and calibrated output error
    calibrated = any(e.output_error is not None for e in plan.layers)
    extra = (("out. error naive", "right"), ("out. error calib.", "right")) if calibrated else ()
    for col, just in (("layer", "left"), ("type", "left"), ("shape", "left"), ("action", "left"),
                      ("params before", "right"), ("params after", "right"),
                      ("sym. error", "right"), *extra, ("reason / note", "left"),
                      ("FLOPs", "right")):
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
                      fmt_int(e.params_after), fmt_err(e.symmetrization_error), *cells, escape(note),
                      _flops_cell(e))
    if max_rows is not None and len(rows) > max_rows:
        table.add_row(f"… {len(rows) - max_rows} more", *([""] * (len(table.columns) - 1)))
    return table


def _flops_cell(e) -> str:
    """Multiply-adds per output position after/before: the fast form's ratio, or 1× and
    why the layer runs dense."""
    if not e.converted:
        return ""
    return f"{e.flops_ratio:.3g}×" if e.dense_reason is None else "1× (dense)"


def totals_line(plan: Plan) -> str:
    if isinstance(plan, AutoPlan):
        return auto_totals(plan)
    return (
        f"[bold]{plan.scheme}[/]: {len(plan.converted)} layers converted, "
        f"{len(plan.skipped)} skipped; parameters {plan.total_before:,} → {plan.total_after:,} "
        f"([bold green]−{plan.saved_fraction:.2%}[/])"
    )


def _short(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 10_000:
        return f"{n / 1e3:.0f}k"
    return f"{n:,}"


def auto_table(plan: AutoPlan, title: str, show_skipped: bool = True, max_rows: int | None = None):
    """Per layer: the chosen scheme, its cost, and the alternatives' costs (−saved)."""
    table = Table(title=title, show_lines=False)
    for col, just in (("layer", "left"), ("shape", "left"), ("scheme", "left"),
                      ("params before", "right"), ("params after", "right"),
                      (plan.cost_name, "right"), ("alternatives: cost (saved)", "left"),
                      ("FLOPs", "right")):
        table.add_column(col, justify=just, overflow="fold")
    rows = [e for e in plan.layers if show_skipped or e.converted]
    shown = rows if max_rows is None else rows[:max_rows]
    for e in shown:
        shape = "×".join(str(s) for s in e.shape) + (f" g={e.groups}" if e.groups != 1 else "")
        alts = [f"{s} {a['cost']:.3f} (−{_short(a['saved'])})"
                for s, a in (e.alternatives or {}).items() if not (e.converted and s == e.scheme)]
        if e.converted:
            scheme = f"[green]{escape(e.scheme)}[/]"
            other = " · ".join(alts) or "—"
        else:
            scheme = "[dim]none[/]"
            other = " · ".join(alts) if alts else (e.reason or "")
        if e.aliases:
            other += f" (tied with {', '.join(e.aliases)})"
        cost = "—" if e.cost is None else f"{e.cost:.3f}"
        table.add_row(escape(e.name), shape, scheme, fmt_int(e.params_before),
                      fmt_int(e.params_after), cost, escape(other), _flops_cell(e))
    if max_rows is not None and len(rows) > max_rows:
        table.add_row(f"… {len(rows) - max_rows} more", *([""] * (len(table.columns) - 1)))
    return table


def _auto_target(plan: AutoPlan) -> str:
    if plan.target_flops is None:
        return f"target {plan.target_reduction:.2%}"
    after = "—" if plan.flops_after is None else f"{plan.flops_after:.3f}"
    return f"FLOPs {after}× of the source, target {plan.target_flops:.2f}×"


def auto_totals(plan: AutoPlan) -> str:
    counts = ", ".join(f"{s} {n}" for s, n in plan.scheme_counts.items()) or "none"
    line = (
        f"[bold]auto[/] ({', '.join(plan.schemes)}; cost: {plan.cost_name}): "
        f"{len(plan.converted)} layers converted ({counts}), {len(plan.skipped)} skipped; "
        f"parameters {plan.total_before:,} → {plan.total_after:,} "
        f"([bold green]−{plan.saved_fraction:.2%}[/], {_auto_target(plan)}); "
        f"total cost {plan.total_cost:.4f}"
    )
    if plan.reachable and plan.lower_bound is not None:
        gap = plan.total_cost - plan.lower_bound
        line += f", lower bound {plan.lower_bound:.4f} (at most {gap:.4f} above the optimum)"
    if not plan.reachable:
        line += (f"\n[bold red]cannot be reached[/]: {plan.unreachable_message()} Shown: the "
                 "largest-reduction plan.")
    return line


__all__ = ["auto_table", "auto_totals", "fmt_err", "fmt_int", "plan_table", "schemes_table",
           "totals_line"]
