"""The code's licence file matches pyproject, and every bundled domain's licence is stated where a
user looks for it (corpus README table, SOURCES.yaml) and summarised in the README."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "opmix_ray" / "corpus"


def test_license_file_is_the_apache_2_text_pyproject_names():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}


def test_every_bundled_domain_states_its_licence():
    sources = yaml.safe_load((CORPUS / "SOURCES.yaml").read_text())
    table = (CORPUS / "README.md").read_text()
    readme = (ROOT / "README.md").read_text()
    licence_section = readme[readme.index("## License"):]
    for name, info in sources.items():
        spdx = info["license"].split(".")[0].split(",")[0].strip()  # e.g. "GPL-2.0-or-later"
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        assert spdx.replace("-", " ").lower().split()[0] in row.replace("-", " ").lower(), (name, spdx, row)
        assert f"`{name}`" in licence_section or re.search(spdx.split("-")[0], licence_section), name
    assert "GPL-2.0-or-later" in licence_section and "LICENSE" in licence_section
