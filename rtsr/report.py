"""Markdown tables for the bench reports: one header, one row per measurement."""

from __future__ import annotations


def markdown_table(header: list[str], rows: list[list[object]]) -> list[str]:
    """Lines of a Markdown table; cells are already formatted (or printed with str)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]
