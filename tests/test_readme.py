"""The README's "At 3 a.m." blocks are what a person pastes under pressure: every
`supabackup` command in them parses with the real command line's parser, every event file
they name exists and is a valid request, and every stack output they name is one the
template has. A flag renamed or an event removed fails here, not at 3 a.m."""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest
from supabackup.cli import build_parser

from .helpers import EVENTS, REPO, sam_template

SECTION = "## At 3 a.m."


def section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return text[start:end]


def commands(text: str) -> list[list[str]]:
    """Each shell command of the section's ```sh blocks: continuation lines joined,
    comments dropped, variables and placeholders left as words."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        pending = ""
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            pending += line
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # a quotation goes on on the next line
                pending += "\n"
                continue
            pending = ""
            out += [part for part in _split_pipes(words) if part]
        assert not pending, pending
    return out


def _split_pipes(words: list[str]) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for word in words:
        if word in ("|", "&&"):
            parts.append([])
        else:
            parts[-1].append(word)
    return parts


def test_the_section_is_linked_from_the_top_and_has_every_situation() -> None:
    text = (REPO / "README.md").read_text()
    assert text.index("(#at-3-am)") < text.index(SECTION)
    for situation in ("Restore the latest backup", "before a bad migration", "one table",
                      "Storage files", "new Supabase project"):
        assert situation in section(), situation


def test_every_supabackup_command_parses() -> None:
    found = [words for words in commands(section()) if words[0] == "supabackup"]
    assert len(found) >= 8
    parser = build_parser()
    for words in found:
        try:
            parser.parse_args(words[1:])
        except SystemExit as exc:  # argparse's way to refuse
            pytest.fail(f"{shlex.join(words)}: refused ({exc.code})")


def test_every_event_and_output_named_exists() -> None:
    text = section()
    events = set(re.findall(r"events/([\w-]+\.json)", text))
    assert events >= {"restore-latest.json", "restore-large.json", "restore-into-supabase.json"}
    for name in events:
        assert (EVENTS / name).is_file(), name
    outputs: dict[str, Any] = sam_template()["Outputs"]
    for name in set(re.findall(r"<(\w+(?:Name|Arn))>", text)) | set(
            re.findall(r"the stack's `(\w+)` output", text)):
        assert name in outputs, name
