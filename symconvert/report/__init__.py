"""The report: one computation, rendered as table/JSON/Markdown/plot."""
