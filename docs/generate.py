"""Rewrite the generated tables in docs/: the server's and the training job's flags, from their settings
models (the one source of each flag, default and meaning). Never edit those tables by hand.

    python docs/generate.py          # rewrite them (make docs)
    python docs/generate.py --check  # exit 1 if a page is stale (the docs test runs this)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

DOCS = Path(__file__).resolve().parent
if str(DOCS.parent) not in sys.path:  # run as a script from anywhere: the repo's packages first
    sys.path.insert(0, str(DOCS.parent))


def _server_flags() -> str:
    from lorayard.server.settings import flags_markdown

    return flags_markdown()


def _training_flags() -> str:
    from lorayard.train.config import flags_markdown

    return flags_markdown()


TABLES: dict[str, tuple[str, Callable[[], str]]] = {
    "server flags": ("serving.md", _server_flags),
    "training flags": ("training.md", _training_flags),
}
"""Marker name -> (page under docs/, what goes between its markers)."""


def begin_marker(name: str) -> str:
    return f"<!-- {name}: written by python docs/generate.py -->\n"


def end_marker(name: str) -> str:
    return f"<!-- end of {name} -->\n"


def rendered(text: str, name: str, table: str) -> str:
    """``text`` with the region between ``name``'s markers replaced by ``table``."""
    begin, end = begin_marker(name), end_marker(name)
    if begin not in text or end not in text:
        raise SystemExit(f"docs: the markers for {name!r} are missing ({begin.strip()} ... {end.strip()})")
    head, rest = text.split(begin, 1)
    _old, tail = rest.split(end, 1)
    return f"{head}{begin}{table}{end}{tail}"


def stale_pages() -> dict[Path, str]:
    """Pages whose generated regions differ from what the models say now: path -> new text."""
    pages: dict[Path, str] = {}
    for name, (page, make) in TABLES.items():
        path = DOCS / page
        current = pages.get(path, path.read_text())
        pages[path] = rendered(current, name, make())
    return {path: text for path, text in pages.items() if path.read_text() != text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is stale; write nothing")
    args = parser.parse_args()
    stale = stale_pages()
    for path, text in stale.items():
        if args.check:
            print(f"{path.relative_to(DOCS.parent)} is stale: run python docs/generate.py", file=sys.stderr)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(DOCS.parent)}")
    if args.check and stale:
        sys.exit(1)


if __name__ == "__main__":
    main()
