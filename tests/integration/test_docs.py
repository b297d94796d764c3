"""The README orients and the docs site explains: the README stays short and keeps the commands CI runs,
the site builds strictly (a dead link, a missing page or an unknown anchor fails), and no page cites the
team's internal work numbers (a figure carries a date and a machine, not a session or an issue)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 300

# "the fifth session", "session 8", "(issue 25)", "issue #25", "issue 25 item 3", "the target":
# work history a user never saw. "a session of their own" (a process session) is fine.
ORDINALS = "first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth"
INTERNAL = [
    re.compile(rf"\b(?:{ORDINALS}|\d+(?:st|nd|rd|th))\s+session\b", re.IGNORECASE),
    re.compile(r"\bsession\s+#?\d+\b", re.IGNORECASE),
    re.compile(r"\bissue\s+#?\d+\b", re.IGNORECASE),
    re.compile(r"\bthe issue's\b", re.IGNORECASE),
]


def _ci_commands() -> list[str]:
    """The command lines of .ci/run that install and test (comments and shell set-up left out)."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if line.strip().startswith("python3 -m venv")]


def test_readme_is_short() -> None:
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail into docs/"


def test_readme_keeps_the_commands_ci_runs() -> None:
    readme_lines = {line.strip() for line in README.read_text().splitlines()}
    commands = _ci_commands()
    assert commands, ".ci/run has no `python3 -m venv ...` line to check"
    for command in commands:
        assert command in readme_lines, f".ci/run runs a command README.md no longer shows verbatim: {command}"
    first = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e . "
             "&& python launch.py")
    assert first in readme_lines, "README.md lost its first command (install and train)"
    assert "## The two commands" in readme_lines and "## Measured" in readme_lines


def test_readme_links_into_docs_exist() -> None:
    targets = re.findall(r"\]\((docs/[^)#\s]+)", README.read_text())
    assert targets, "README.md links to no docs page"
    missing = sorted({t for t in targets if not (ROOT / t).is_file()})
    assert not missing, f"README.md links to docs pages that do not exist: {missing}"


def test_every_docs_page_is_in_the_nav() -> None:
    nav = set(re.findall(r":\s*([\w./-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE))
    missing = sorted(p.name for p in PAGES if p.name not in nav)
    assert PAGES and not missing, f"docs pages missing from mkdocs.yml's nav: {missing}"


@pytest.mark.parametrize("path", [README, ROOT / "BENCHMARKS.md", *PAGES], ids=lambda p: p.name)
def test_no_internal_work_numbers(path: Path) -> None:
    hits = [f"{path.name}:{i}: {m.group(0)!r}"
            for i, line in enumerate(path.read_text().splitlines(), 1)
            for pattern in INTERNAL for m in pattern.finditer(line)]
    assert not hits, "date a figure instead of numbering sessions or citing issues:\n" + "\n".join(hits)


def test_the_internal_number_patterns_catch_what_they_should() -> None:
    def flagged(text: str) -> bool:
        return any(p.search(text) for p in INTERNAL)

    assert flagged("the default of the fifth session") and flagged("(issue 25; seed 1234)")
    assert flagged("measured in the 8th session") and flagged("issue #43 item 5")
    assert not flagged("they run in a session of their own") and not flagged("a sampling session")
    assert not flagged("a known issue with NFS locks")


@pytest.mark.slow  # builds the whole site (2-5 s on 2 cores, more on a loaded machine); the full suite runs it
def test_docs_build_strictly(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner: noise here
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"mkdocs build --strict failed (rc {out.returncode}):\n{out.stdout[-4000:]}{out.stderr[-4000:]}"
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "results" / "index.html").is_file()
