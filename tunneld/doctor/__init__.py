"""`tunneld doctor -c FILE`: the first hour's common mistakes, found and explained.

Each check prints one line, `ok`, `warn` or `FAIL` (and `skip` when a check could not
run because an earlier one failed); a warning or a failure adds the fix in one
sentence. Exit 0 when every check passed, 1 with warnings, 2 with a failure.
The role (home or relay) comes from the file, as for `check-config`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Check", "Report", "run_doctor"]

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"


@dataclass(frozen=True)
class Check:
    name: str
    level: str  # OK, WARN, FAIL or SKIP
    message: str
    fix: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    echo: Callable[[str], None] | None = None  # print each check as it is made

    def add(self, name: str, level: str, message: str, fix: str = "") -> Check:
        check = Check(name, level, message, fix)
        self.checks.append(check)
        if self.echo is not None:
            for line in format_check(check):
                self.echo(line)
        return check

    def ok(self, name: str, message: str) -> Check:
        return self.add(name, OK, message)

    def warn(self, name: str, message: str, fix: str = "") -> Check:
        return self.add(name, WARN, message, fix)

    def fail(self, name: str, message: str, fix: str) -> Check:
        return self.add(name, FAIL, message, fix)

    def skip(self, name: str, message: str) -> Check:
        return self.add(name, SKIP, message)

    def level_of(self, name: str) -> str | None:
        for check in self.checks:
            if check.name == name:
                return check.level
        return None

    @property
    def exit_code(self) -> int:
        levels = {c.level for c in self.checks}
        return 2 if FAIL in levels else 1 if WARN in levels else 0

    def summary(self) -> str:
        count = {lvl: sum(c.level == lvl for c in self.checks) for lvl in (OK, WARN, FAIL, SKIP)}
        parts = [f"{count[OK]} ok", f"{count[WARN]} warning(s)", f"{count[FAIL]} failure(s)"]
        if count[SKIP]:
            parts.append(f"{count[SKIP]} skipped")
        return ", ".join(parts)


def format_check(check: Check) -> list[str]:
    lines = [f"{check.level:<5} {check.name}: {check.message}"]
    if check.fix and check.level in (WARN, FAIL):
        lines.append(f"      fix: {check.fix}")
    return lines


def run_doctor(path: str, resolve: list[str], echo: Callable[[str], None] | None = None) -> Report:
    """Every check for the config's role; a config that does not load is one failure."""
    from tunneld.config import HomeConfig, load_config
    from tunneld.doctor.probes import Resolver
    from tunneld.errors import ConfigError

    report = Report(echo=echo)
    try:
        resolver = Resolver.parse(resolve)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        config = load_config(path)
    except ConfigError as exc:
        report.fail("config", str(exc), "correct the key the message names, then run doctor again")
        return report
    if isinstance(config, HomeConfig):
        from tunneld.doctor.home import check_home_setup

        check_home_setup(config, resolver, report)
    else:
        from tunneld.doctor.relay import check_relay_setup

        check_relay_setup(config, resolver, report)
    return report
