"""The documentation tells the truth: its tables are generated from the scripts and the measurements."""

import pytest

from cilia_cvae import readme_tables
from conftest import REPOSITORY_ROOT

REGENERATE = "run python Scripts/cilia_cvae/readme_tables.py"


@pytest.mark.parametrize("document", readme_tables.DOCUMENTS, ids=lambda path: path.name)
def test_generated_tables_match_the_scripts_and_the_measurements(document):
    current = document.read_text(encoding="utf-8")
    name = document.relative_to(REPOSITORY_ROOT)
    assert readme_tables.updated_document(current) == current, (
        f"{name} is out of date with the scripts or docs/*.json: {REGENERATE}"
    )


def test_every_script_has_a_settings_table():
    settings = readme_tables.SETTINGS.read_text(encoding="utf-8")
    scripts = (
        "cvae_pre_processing",
        "make_phantom_dataset",
        "cvae_training_224x224",
        "cvae_training_448x448",
        "cvae_inference",
        "cvae_evaluate",
        "cvae_compare",
        *readme_tables.SETTINGS_SCRIPTS,
    )
    for script in scripts:
        assert f"<!-- constants:{script} -->" in settings, script


def test_the_quality_tables_are_generated_from_the_comparison():
    # The README's headline and the full comparison both come from the file cvae_compare.py writes.
    readme = readme_tables.README.read_text(encoding="utf-8")
    results = readme_tables.RESULTS.read_text(encoding="utf-8")
    assert "<!-- headline:docs/evaluation_224.json -->" in readme
    assert "<!-- evaluation:docs/evaluation_224.json -->" in results


def test_the_readme_stays_short_and_links_its_details():
    readme = readme_tables.README.read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) <= 16_000, "keep the README short: details go to docs/"
    for link in ("docs/settings.md", "docs/results.md", "docs/phantoms.md"):
        assert f"({link})" in readme, link
        assert (REPOSITORY_ROOT / link).is_file(), link


def test_a_share_near_all_or_none_is_not_rounded_to_all_or_none():
    # 99.5% overall beside a class at 99% once read "100% (CP 99%)"; 0.3% near-copies read "0%".
    assert readme_tables._percent(0.995) == "99.5%" and readme_tables._percent(0.003) == "0.3%"
    assert readme_tables._percent(1.0) == "100%" and readme_tables._percent(0.0) == "0%"
    assert readme_tables._percent(0.42) == "42%" and readme_tables._percent(None) == ""
