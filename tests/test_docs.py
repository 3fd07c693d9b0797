"""The documentation site builds with MkDocs in strict mode: a broken link, a missing page or anchor, or an
API reference entry naming a function that no longer exists fails the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_strictly_and_documents_the_api(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                         cwd=REPO, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    reference = (site / "reference" / "index.html").read_text()
    for name in ("from_pretrained", "predict_iter", "segment_video", "Segmentation", "MissingFileError", "fuse"):
        assert name in reference, name
    assert (site / "images" / "demo-page.png").is_file() and (site / "images" / "architecture.svg").is_file()
    assert "benchmarks/cli_errors.py" in (site / "benchmarks" / "index.html").read_text()  # RESULTS.md included


def test_the_readme_is_short_and_points_into_the_docs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 120  # a newcomer reads it in five minutes
    for page in ("install", "models", "python", "cli", "training", "reference"):
        assert f"(docs/{page}.md)" in readme and (REPO / "docs" / f"{page}.md").is_file()
