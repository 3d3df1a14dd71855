"""``vstack rules check FILE...``: parse and check ``.rules`` files.

Prints ``file:line:col: error|warning: message`` per diagnostic (errors and warnings are
kept apart: errors first) and exits 0 when clean, 1 with warnings only, 2 with any error
(a file that does not parse or cannot be read is an error).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from vstack.cli.app import rules_app
from vstack.decision.checker import Diagnostic, check, exit_code
from vstack.decision.parser import RulesSyntaxError, parse_rules_file

EXIT_CLEAN, EXIT_WARNINGS, EXIT_ERRORS = 0, 1, 2


def check_files(paths: list[str]) -> tuple[list[Diagnostic], int]:
    """All diagnostics of ``paths`` and the exit code."""
    diags: list[Diagnostic] = []
    for path in paths:
        try:
            rs = parse_rules_file(path)
        except RulesSyntaxError as e:
            diags.append(Diagnostic(e.filename, e.line, e.col, "error", e.message))
            continue
        diags.extend(check(rs))
    return diags, exit_code(diags)


@rules_app.command("check")
def rules_check(
    files: Annotated[list[str], typer.Argument(help=".rules files to check")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no summary line")] = False,
) -> None:
    """Check .rules files. Exit codes: 0 clean, 1 warnings only, 2 errors."""
    diags, code = check_files(files)
    errors = [d for d in diags if d.severity == "error"]
    warnings = [d for d in diags if d.severity == "warning"]
    for d in errors:
        print(d)
    for d in warnings:
        print(d)
    if not quiet:
        print(f"{len(files)} file(s): {len(errors)} error(s), {len(warnings)} warning(s)",
              file=sys.stderr)
    raise typer.Exit(code)
