"""The README's commands are real: every ``subgrad`` command line in its code blocks parses with the
command line's own parser (each flag exists and takes what the README gives it), and ``.ci/run`` runs the
README's test command word for word.  Running them end to end is the slow tier's and ``.ci/run``'s job."""

import pathlib
import re
import shlex

import pytest

from subgrad import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CODE_LINES = [line.strip() for line in README.splitlines() if line.startswith("    ") and line.strip()]


def _subgrad_commands() -> list[str]:
    """Each ``subgrad ...`` command of the README's code blocks, without comments, the first of each
    ``[--flag a|b]`` alternative, and without the lines that elide arguments with ``...``."""
    found = []
    for line in CODE_LINES:
        for part in line.split("&&"):
            part = part.split("  #")[0].strip()
            if not part.startswith("subgrad ") or "..." in part:
                continue
            part = re.sub(
                r"\[(--[\w-]+)(?: ([^\]|]+)(?:\|[^\]]+)?)?\]", lambda m: " ".join(filter(None, m.groups())), part
            )
            found.append(part)
    return found


def test_readme_has_commands():
    assert len(_subgrad_commands()) >= 10


@pytest.mark.parametrize("command", _subgrad_commands())
def test_readme_command_parses(command):
    argv = shlex.split(command)[1:]
    args = cli.build_parser().parse_args(argv)  # SystemExit (status 2) on an unknown flag or a bad value
    assert args.command == argv[0]


def test_ci_runs_the_readme_test_command():
    tests = README[README.index("## Tests") :]
    command = next(line.strip() for line in tests.splitlines() if line.startswith("    "))
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines(), f".ci/run does not run the README's test command {command!r}"
