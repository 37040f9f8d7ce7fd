"""The README and docs/ hold together: every relative link leads to a file (and a heading) that
exists, the README stays a short newcomer's page, and its two commands are the Makefile's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

_FENCE = re.compile(r"^(`{3,}[^`]*|~{3,}.*)$")  # a backtick fence's info string holds no backtick
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_CODE_SPAN = re.compile(r"(`+).+?\1")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _links(page: Path) -> list[str]:
    return [m.group(1) for line in _prose(page.read_text()) for m in _LINK.finditer(_CODE_SPAN.sub("", line))]


def _anchors(page: Path) -> set[str]:
    """GitHub's ids for a page's headings: lower case, punctuation dropped, spaces as dashes,
    a repeated one numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(page.read_text()):
        if not (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:...


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page: Path) -> None:
    broken = []
    for target in filter(_relative, _links(page)):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: {file.name} has no heading #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_the_link_check_sees_links_and_headings_as_github_does(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## What `max_cost` promises\n\n## errors/\n\n## errors/\n\n"
                    "See [a](other.md#x), ![img](pic.png) and `[not](a-link)`.\n\n"
                    "```` ```python ```` is inline code, not a fence: [c](c.md)\n\n"
                    "```bash\n# a comment, no heading\n[no](link)\n```\n")
    assert _links(page) == ["other.md#x", "pic.png", "c.md"]
    assert _anchors(page) == {"title", "what-max_cost-promises", "errors", "errors-1"}


def test_the_readme_stays_a_short_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < 220, f"README.md has {len(lines)} lines; move the detail into a docs/ page"


def test_the_readme_names_every_docs_page_and_the_index_lists_them() -> None:
    readme, index = set(_links(README)), set(_links(DOCS / "README.md"))
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "README.md":
            assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
            assert page.name in index, f"docs/README.md does not list {page.name}"


def test_the_readmes_two_commands_are_the_makefiles_and_ci_runs_the_test_one() -> None:
    text = README.read_text()
    section = text.split("## Two commands", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make quickstart", "make test"]

    makefile = (ROOT / "Makefile").read_text()
    targets = dict(re.findall(r"^([\w-]+):[^\n]*\n((?:\t[^\n]*\n)*)", makefile, flags=re.M))
    assert "genflow run configs/quickstart.yaml" in targets["quickstart"]
    assert "pytest" in targets["test"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci


def test_the_config_the_readme_shows_is_the_quickstarts() -> None:
    section = README.read_text().split("## One config", 1)[1]
    shown = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert shown == (ROOT / "configs" / "quickstart.yaml").read_text()
