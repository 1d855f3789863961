"""The docs stay a landing page and a set of pages whose links lead somewhere (issue 44).

README.md is short, its results table has a handful of one-line rows, and every relative link in
README.md and docs/*.md names a file or folder of this repository (anchors are not checked).
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks: a link-like line in a code sample is not a link."""
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def _relative_links(page: Path) -> list[str]:
    links = _LINK.findall(_prose(page.read_text()))
    return [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:", link) and not link.startswith("#")]


def test_readme_is_a_landing_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; reference material belongs in docs/"


def test_readme_results_table_has_at_most_six_rows():
    text = _prose(README.read_text())
    section = text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert len(rows) >= 3, "the Results section has no table"
    body = rows[2:]  # past the header and the |---| line
    assert 1 <= len(body) <= 6, f"{len(body)} rows in README.md's results table; the rest is bench/RESULTS.md's"


def test_readme_links_every_docs_page():
    linked = {(README.parent / link.split("#", 1)[0]).resolve() for link in _relative_links(README)}
    assert DOCS, "docs/ has no pages"
    assert [page.name for page in DOCS if page.resolve() not in linked] == []


def test_relative_links_point_to_files_that_exist():
    broken = []
    for page in [README, *DOCS]:
        for link in _relative_links(page):
            target = (page.parent / link.split("#", 1)[0]).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link}")
    assert broken == []


def test_docs_link_only_inside_the_repository():
    outside = []
    for page in DOCS:
        for link in _LINK.findall(_prose(page.read_text())):
            target = (page.parent / link.split("#", 1)[0]).resolve()
            if re.match(r"[a-z][a-z0-9+.-]*:", link) or not target.is_relative_to(ROOT):
                outside.append(f"{page.relative_to(ROOT)}: {link}")
    assert outside == []
