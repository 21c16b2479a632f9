"""The docs say what the repository does: the migrations they cite exist, and what `make run` installs
is what scripts/dev installs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs" / "system").glob("*.md"))]


def test_every_migration_the_docs_cite_exists() -> None:
    versions = ROOT / "migrations" / "versions"
    known = {path.stem for path in versions.glob("*.py")}
    for path in versions.glob("*.py"):
        revision = re.search(r'^revision = "([^"]+)"', path.read_text(), re.M)
        assert revision, path
        known.add(revision.group(1))
    cited = {(doc.name, name) for doc in DOCS for name in re.findall(r"`(\d{4}_[a-z_]+)`", doc.read_text())}
    assert cited, "the docs cite no migration at all: the pattern is wrong"
    assert sorted(c for c in cited if c[1] not in known) == []


def test_the_readme_says_which_requirements_make_run_installs() -> None:
    dev = (ROOT / "scripts" / "dev").read_text()
    kind = re.search(r"^scripts/bootstrap (\w+)", dev, re.M)
    assert kind, "scripts/dev no longer bootstraps .venv"
    bootstrap = (ROOT / "scripts" / "bootstrap").read_text()
    installed = (
        "requirements-dev.txt" if kind.group(1) == "dev" and "requirements-dev.txt" in bootstrap else "requirements.txt"
    )
    readme = " ".join((ROOT / "README.md").read_text().split())
    said = re.search(r"`make run` creates `\.venv`, installs `([\w.-]+)`", readme)
    assert said and said.group(1) == installed, said and said.group(0)
