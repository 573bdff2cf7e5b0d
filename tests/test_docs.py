"""The documentation a user reads agrees with the code: the option reference under docs/commands/ is each
command's --help (regenerate with `make docs`), README links every page, and help names what it promises."""

import re
from pathlib import Path

import pytest

from lorasb_cli import reference

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", reference.command_names())
def test_each_command_page_carries_its_current_help(name):
    page = reference.page_path(name)
    assert page.is_file(), f"{page} is missing: run make docs"
    text = page.read_text()
    assert reference.rendered(text, name) == text, f"{page} differs from `lorasb {name} --help`: run make docs"


def test_a_page_whose_help_went_stale_is_rewritten():
    text = reference.page_path("train").read_text()
    prose, generated = text.split(reference.BEGIN)
    stale = prose + reference.BEGIN + generated.replace("--max-steps", "--max-stepz")
    assert stale != text and reference.rendered(stale, "train") == text


def test_readme_links_every_command_page():
    linked = set(re.findall(r"\(docs/commands/([a-z-]+)\.md\)", (ROOT / "README.md").read_text()))
    assert linked == set(reference.command_names())


def test_data_help_names_every_built_in_set():
    from lorasb_cli import builtin_data

    help_text = " ".join(reference.help_text("train").split())
    assert all(name in help_text for name in builtin_data.NAMES)


def test_every_model_alias_says_what_it_is_and_downloads():
    from lorasb_cli.models import ALIASES, HUB_MODELS

    assert set(ALIASES.values()) <= set(HUB_MODELS)
