"""The README is the way in: it links every page under docs/."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).parents[2]


def test_readme_links_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text()
    pages = sorted(path.name for path in (REPO / "docs").glob("*.md"))
    assert pages
    missing = [name for name in pages if f"(docs/{name})" not in readme]
    assert not missing, f"README.md's documentation table lacks {missing}"
