"""The docs stay true to the code: every setting on the configuration page, a README that is a door."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fltraining.settings import Settings

# Pure functions: no service and no store, so the blob store tier cannot change them (run once).
pytestmark = pytest.mark.store_independent

ROOT = Path(__file__).resolve().parent.parent
README_LIMIT = 12_000


def settings_page() -> ModuleType:
    """docs/settings_page.py, the generator of the configuration page's table."""
    spec = importlib.util.spec_from_file_location("settings_page", ROOT / "docs" / "settings_page.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_setting_is_on_the_configuration_page() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    rows = {match.group(1): match.group(0) for match in re.finditer(r"^\| `(FLTRAINING_[A-Z_]+)` \|.*$", page, re.M)}
    missing = [f"FLTRAINING_{name.upper()}" for name in Settings.model_fields if f"FLTRAINING_{name.upper()}" not in rows]
    assert not missing, f"docs/configuration.md lacks {missing}: run `make docs` and commit the page"
    assert settings_page().with_table(page) == page, "docs/configuration.md is out of date: run `make docs`"


def test_readme_is_short_and_its_links_lead_somewhere() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= README_LIMIT, f"README.md has {len(readme)} characters; the limit is {README_LIMIT}"
    targets = re.findall(r"\]\(((?!https?://|#|mailto:)[^)#\s]+)", readme)
    assert any(target.startswith("docs/") for target in targets)
    assert [target for target in targets if not (ROOT / target).exists()] == []


def test_settings_page_check_mode_passes_on_the_committed_page() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "settings_page.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
