"""Tables tests fill as they run, printed in the terminal summary at the end of the run.

They live in the run's ``config.stash``, so no module keeps them in a global and conftest
needs to know no test module.
"""

from __future__ import annotations

import pytest


class SummaryTable:
    """A titled table of text rows under a header line."""

    def __init__(self, title: str, head: str) -> None:
        self.title = title
        self.head = head
        self.rows: list[str] = []

    def add(self, row: str) -> None:
        self.rows.append(row)

    def render(self) -> str:
        return "\n".join([self.head, "-" * len(self.head), *self.rows])


_TABLES = pytest.StashKey[dict[str, SummaryTable]]()


def summary_table(config: pytest.Config, title: str, head: str) -> SummaryTable:
    """This run's table called ``title``, made on first use."""
    return config.stash.setdefault(_TABLES, {}).setdefault(title, SummaryTable(title, head))


def write_summary_tables(config: pytest.Config, terminalreporter: pytest.TerminalReporter) -> None:
    """Each table that has rows, under its title."""
    for table in config.stash.get(_TABLES, {}).values():
        if table.rows:
            terminalreporter.write_sep("=", table.title)
            terminalreporter.write_line(table.render())
