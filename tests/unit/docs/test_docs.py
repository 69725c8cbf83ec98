"""The README is a map: short, its links land, and no page names a path of the machine it was written on."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PAGES = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
MACHINE_PATHS = re.compile(r"(?<![\w.])/(?:work|root|home/\w+|Users/\w+)/")


GENERATED = re.compile(r"<!-- bench summary:.*?<!-- end of bench summary -->", re.DOTALL)


def test_readme_is_a_map():
    text = (REPO / "README.md").read_text()
    lines = text.splitlines()
    # the benchmark table is written by bench.report and grows with the suites: only prose counts
    written = GENERATED.sub("", text).splitlines()
    assert len(written) < 200, f"README.md has {len(written)} written lines; long reference belongs in docs/"
    assert "make install && make demo" in "\n".join(lines[:20])
    assert "make test" in "\n".join(lines[:20])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_land(page: Path):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = target.split("#", 1)[0]
        assert (page.parent / path).exists(), f"{page.relative_to(REPO)} links to missing {target}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_machine_specific_paths(page: Path):
    found = MACHINE_PATHS.findall(page.read_text())
    assert not found, f"{page.relative_to(REPO)} names machine paths: {found}"


def test_generated_tables_are_current():
    """The flag tables in docs/ are what the settings models say now (``make docs`` rewrites them)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "docs" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
