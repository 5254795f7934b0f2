"""The documentation builds with ``mkdocs build --strict``, offline: no broken link, anchor or
reference, every command and option in the CLI reference, the API pages from the docstrings, the
notebooks as pages with their figures; and the README's links lead somewhere.

The notebooks are executed for the pages (docs/hooks.py) once per version of their cells and of
the package's code, into .cache/docs-notebooks: the first build takes about a minute on two
cores, later ones seconds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner, not a warning of ours
    env.pop("GEOUPSAMPLE_DOCS_NOTEBOOKS", None)  # the pages get executed notebooks
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def page(site: Path, path: str) -> str:
    return (site / path / "index.html").read_text(encoding="utf-8")


def test_every_page_of_the_nav_is_built(site: Path) -> None:
    for md in (ROOT / "docs").rglob("*.md"):
        rel = md.relative_to(ROOT / "docs").with_suffix("")
        built = site / "index.html" if rel.name == "index" else site / rel / "index.html"
        assert built.exists(), md


def test_cli_reference_has_every_command_and_option(site: Path) -> None:
    import typer

    from geoupsample.cli import app

    html = page(site, "reference/cli")
    assert "<!-- cli-reference -->" not in html
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        assert f'id="geoupsample-{name}"' in html, name
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert f"<code>{opt}</code>" in html, (name, opt)


def test_api_reference_comes_from_the_docstrings(site: Path) -> None:
    expected = {
        "reference/python": ["geoupsample.upsample", "geoupsample.fit", "geoupsample.Kernels"],
        "reference/scenes": ["geoupsample.pipeline.upsample_raster",
                             "geoupsample.time_series.upsample_series",
                             "geoupsample.featuremaps.features_raster",
                             "geoupsample.segmentation.segment_raster",
                             "geoupsample.prediction.predict_raster"],
        "reference/xarray": ["geoupsample.xarray.upsample", "geoupsample.xarray.predict"],
        "reference/tiling": ["tiling.run", "tiling.OutputSpec"],
    }  # fmt: skip
    for path, ids in expected.items():
        html = page(site, path)
        for ident in ids:
            assert f'id="{ident}"' in html, (path, ident)
        assert ":func:" not in html and ":class:" not in html  # reST roles became links or code


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")),
                         ids=lambda p: p.stem)
def test_notebook_pages_show_their_figures(site: Path, notebook: Path) -> None:
    html = page(site, f"notebooks/{notebook.stem}")
    assert re.search(r'<img[^>]+src="data:image/(png|jpeg)', html), notebook.name
    assert "Traceback" not in html


def test_readme_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link) or link.startswith("#"):
            continue
        assert (ROOT / link.split("#", 1)[0]).exists(), link
