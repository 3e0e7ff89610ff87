"""The differential suite's figures in the session summary (CI prints them)."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.home import test_differential

    for name, report in test_differential.RESULTS.items():
        from tests.home.httpdiff import versions

        terminalreporter.write_sep("-", f"differential HTTP framing ({name})")
        terminalreporter.write_line(versions())
        terminalreporter.write_line(report.summary())
