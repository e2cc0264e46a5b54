"""The README tells the truth about the code: its settings tables are generated from the scripts."""

from conftest import REPOSITORY_ROOT
from cilia_cvae import readme_tables


def test_readme_settings_tables_match_the_scripts():
    current = (REPOSITORY_ROOT / "README.md").read_text(encoding="utf-8")
    assert readme_tables.updated_readme(current) == current, (
        "README settings tables are out of date: run python Scripts/cilia_cvae/readme_tables.py")


def test_every_script_has_a_settings_table_and_help():
    current = (REPOSITORY_ROOT / "README.md").read_text(encoding="utf-8")
    for script in ("cvae_pre_processing", "make_phantom_dataset", "cvae_training_224x224", "cvae_training_448x448",
                   "cvae_inference", "cvae_evaluate", "cvae_compare"):
        assert f"<!-- constants:{script} -->" in current
