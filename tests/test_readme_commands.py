"""Every `modalitybank …` line in the README's code blocks is a command the CLI accepts.

Running them all is the job of the slow tests (the README's simulator line runs verbatim in
`test_fl_jobs.py`); this checks, in a second, that no documented sub-command or option has been
renamed or dropped. Usage lines are expanded first: ``a|b`` tries every alternative, ``[...]``
tries the line with and without the optional part.
"""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
from pathlib import Path

import pytest

from modalitybank.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands(text: str) -> list[str]:
    """The ``modalitybank`` lines of the fenced code blocks, ``\\`` continuations joined, comments cut."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("modalitybank "):
                lines.append(line)
    return lines


def expansions(line: str) -> list[list[str]]:
    """Concrete argument lists of a usage line (without the leading ``modalitybank``)."""
    # `fl poc | provision ...`: a spaced bar separates alternative sub-commands
    line = re.sub(r"(\S+) \| (\S+)", r"\1|\2", line)
    optional = re.findall(r"\[([^\[\]]*)\]", line)
    skeleton = re.sub(r"\[[^\[\]]*\]", "{}", line)
    out = []
    for keep in itertools.product((False, True), repeat=len(optional)):
        text = skeleton.format(*(o if k else "" for o, k in zip(optional, keep, strict=True)))
        words = shlex.split(text)[1:]
        for choice in itertools.product(*(w.split("|") if "|" in w else [w] for w in words)):
            out.append([w for w in choice if w != "..."])
    return out


def _subparser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return parser


def concrete(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with each placeholder value (``N``, ``E``, or none, as in ``[--scale]``) replaced by a
    value of the option's type: its first choice, 3 for an int, 0.5 for a float."""
    options = {o: a for a in _subparser(parser, argv)._actions for o in a.option_strings}
    out, words = [], list(argv)
    while words:
        word = words.pop(0)
        out.append(word)
        action = options.get(word)
        if action is None or action.nargs == 0:
            continue
        sample = str(next(iter(action.choices))) if action.choices else {int: "3", float: "0.5"}.get(action.type, "X")
        value = words[0] if words else "--"
        if value.startswith("--"):
            out.append(sample)  # `[--scale]`: the option shown without its value
        elif (value.isupper() and action.choices) or (action.type in (int, float) and not _number(value)):
            words[0] = sample
    return out


def _number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


COMMANDS = readme_commands(README.read_text())


def test_the_readme_shows_commands() -> None:
    assert len(COMMANDS) >= 20 and any("benchmark" in c for c in COMMANDS)


def test_usage_lines_are_expanded() -> None:
    got = expansions("modalitybank fl poc | provision --workdir W [--rounds N] --json")
    assert ["fl", "poc", "--workdir", "W", "--json"] in got
    assert ["fl", "provision", "--workdir", "W", "--rounds", "N", "--json"] in got and len(got) == 4


def test_a_renamed_option_or_placeholder_of_the_wrong_kind_is_caught() -> None:
    parser = build_parser()
    assert concrete(parser, ["benchmark", "--table", "N", "--scale"]) == ["benchmark", "--table", "1", "--scale", "paper"]
    with pytest.raises(SystemExit):
        parser.parse_args(concrete(parser, ["benchmark", "--table", "1", "--no-such-option", "3"]))


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_is_accepted_by_the_cli(line: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for argv in expansions(line):
        argv = concrete(parser, argv)
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"the README's `{line}` as `modalitybank {shlex.join(argv)}`:\n{capsys.readouterr().err}")
