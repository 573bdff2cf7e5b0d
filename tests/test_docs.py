"""The documentation agrees with the code: the option reference under docs/commands/ is each command's --help
(regenerate with `make docs`), README links every page, help names what it promises, and every document the code
cites is in the repository with the section it cites."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorasb_cli import reference
from lorasb_cli.cli import cli


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_each_command_page_carries_its_current_help(name):
    page = reference.page_path(name)
    assert page.is_file(), f"{page} is missing: run make docs"
    text = page.read_text()
    assert reference.rendered(cli, text, name) == text, f"{page} differs from `lorasb {name} --help`: run make docs"


def test_a_page_whose_help_went_stale_is_rewritten():
    text = reference.page_path("train").read_text()
    prose, generated = text.split(reference.BEGIN)
    stale = prose + reference.BEGIN + generated.replace("--max-steps", "--max-stepz")
    assert stale != text and reference.rendered(cli, stale, "train") == text


def test_readme_links_every_command_page():
    linked = set(re.findall(r"\(docs/commands/([a-z-]+)\.md\)", (ROOT / "README.md").read_text()))
    assert linked == set(cli.commands)


def test_data_help_names_every_built_in_set():
    from lorasb_cli import builtin_data

    help_text = " ".join(reference.help_text(cli, "train").split())
    assert all(name in help_text for name in builtin_data.NAMES)


def test_every_model_alias_says_what_it_is_and_downloads():
    from lorasb_cli.models import ALIASES, HUB_MODELS

    assert set(ALIASES.values()) <= set(HUB_MODELS)


ROOT = Path(__file__).parent.parent
# A citation: a markdown document named with a section (`DESIGN.md §2`, `docs/design.md §1, §4`), or any path
# into docs/. Paths a stage or benchmark writes (`results.md`, `out/report.md`) name outputs, not documents.
CITATION = re.compile(r"(?<![\w/*.-])((?:[\w.-]+/)*[\w.-]+\.md(?=\s*§)|docs/[\w./-]+\.md)((?:,?\s*§\d+)*)")


def citations(text: str) -> list[tuple[str, list[str]]]:
    return [(m.group(1), re.findall(r"§(\d+)", m.group(2))) for m in CITATION.finditer(text)]


def _code_files() -> list[Path]:
    files = [ROOT / "Makefile", ROOT / "pyproject.toml"]
    for folder in ("lorasb_cli", "tests", "benchmarks", "examples"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh") and p.is_file()]
    return files


def _sections(document: Path) -> set[str]:
    return set(re.findall(r"^## (\d+)\.", document.read_text(), re.MULTILINE))


def test_every_cited_document_and_section_exists():
    missing = []
    for path in _code_files():
        if path == Path(__file__):  # its examples of citations
            continue
        for cited, sections in citations(path.read_text()):
            document = next((d for d in (ROOT / cited, path.parent / cited) if d.is_file()), ROOT / cited)
            if not document.is_file():
                missing.append(f"{path.relative_to(ROOT)} cites {cited}, which the repository does not hold")
            elif absent := [s for s in sections if s not in _sections(document)]:
                missing.append(f"{path.relative_to(ROOT)} cites {cited} §{', §'.join(absent)}: no such section")
    assert not missing, "\n".join(missing)


def test_the_citation_pattern_finds_what_it_must():
    text = 'x  # (DESIGN.md §3) y docs/design.md §1, §4 and "results.md" z docs/other.md out/report.md'
    assert citations(text) == [("DESIGN.md", ["3"]), ("docs/design.md", ["1", "4"]), ("docs/other.md", [])]
    assert not (ROOT / "DESIGN.md").exists()  # so a citation of it fails the test above
