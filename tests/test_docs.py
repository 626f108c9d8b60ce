"""README.md, docs/ and CONTRIBUTING.md: a front page of at most 150 lines, and in every page a link that leads
somewhere in the repository, a `make` target that exists, and nothing that only this project's own machines have
(a path outside the checkout, an issue number)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def targets():
    """The Makefile's targets: `name:` at the start of a line, and .PHONY's."""
    text = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY: (.*)$", text, re.M).group(1).split()
    return set(phony) | set(re.findall(r"^([a-z][\w-]*):", text, re.M))


def anchors(page):
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert text.index("## Results") < text.index("make test") < text.index("make train")  # results, then commands
    for page in PAGES[1:]:
        assert f"]({page.relative_to(ROOT)})" in text, f"the README does not link {page.relative_to(ROOT)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_to_a_file_of_the_repository(page):
    for link in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists() and ROOT in target.parents or target == ROOT, f"{page.name}: {link} leads nowhere"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target), f"{page.name}: {link}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_make_target_named_exists(page):
    text = page.read_text()  # as code: `make x ...` in a sentence, or a line of a code block
    named = set(re.findall(r"`make ([a-z][\w-]*)", text)) | set(re.findall(r"^\$? ?make ([a-z][\w-]*)", text, re.M))
    assert named and named <= targets() | {"install"}, f"{page.name}: no such target: {named - targets()}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_only_this_projects_machines_have(page):
    text = page.read_text()
    assert "../shared" not in text and "shared/" not in text, f"{page.name} names a path outside the repository"
    assert not re.search(r"(?<![\w&/])#\d+\b", text), f"{page.name} names an issue number"
