"""No dead ends (issue 9, item 9): messages point to flags that exist, the declared Python runs the code, and stores
open the way the README shows without warnings."""

from __future__ import annotations

import ast
import re
import tomllib
import warnings
from pathlib import Path

import pytest
import xarray as xr

from icl_geometry.cli import main

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("extraction", "geometry", "heads", "icl_geometry")
#: Standard-library modules and names that appeared in a Python release later than 3.10.
NEWER_MODULES = {"tomllib": (3, 11)}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    return names | {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and not node.level}


def test_requires_python_covers_the_standard_library_the_code_imports():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(part) for part in re.fullmatch(r">=\s*(\d+)\.(\d+)", declared.strip()).groups())
    needed = {module: version for package in PACKAGES for path in (ROOT / package).rglob("*.py")
              for module, version in NEWER_MODULES.items() if module in _imports(path)}
    assert needed, "the scan found no tomllib import: update NEWER_MODULES"
    too_new = {module: version for module, version in needed.items() if version > minimum}
    assert not too_new, f"requires-python {declared} but the code imports {too_new}"


@pytest.fixture(scope="module")
def two_group_store(tiny_gemma, tmp_path_factory) -> Path:
    from extraction.extractor import extract

    store = tmp_path_factory.mktemp("consolidated") / "s.zarr"
    extract(tiny_gemma, store, task="sentiment", shots=2, n=6, progress=False)
    extract(tiny_gemma, store, task="sentiment", shots=0, n=6, progress=False)
    return store


def test_groups_open_with_xarray_defaults_without_warnings(two_group_store):
    from extraction.store import open_group

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for group in ("icl", "zero_shot"):
            opened = xr.open_zarr(two_group_store, group=group)
            reference = open_group(two_group_store, group)
            assert opened.attrs == reference.attrs
            xr.testing.assert_identical(opened["hidden"].load(), reference["hidden"].load())


def test_consolidated_metadata_follows_attrs_and_new_groups(two_group_store, tiny_gemma, tmp_path):
    """Metadata written after the first consolidation (semantic decoding's attrs, head scores) stays visible."""
    import shutil

    from geometry.semantic import ATTR, decode_store_directions
    from heads.scores import score

    store = tmp_path / "s.zarr"
    shutil.copytree(two_group_store, store)
    decode_store_directions(tiny_gemma, store, "icl", layers=[1], top_tokens=2)
    score(tiny_gemma, shots=2, n=4, n_random=2, repeat=5, store=store, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ATTR in xr.open_zarr(store, group="icl").attrs
        assert "pth" in xr.open_zarr(store, group="head_scores")


def test_changed_study_configuration_points_to_a_flag_that_exists(tiny_gemma_dir, tmp_path, capsys):
    """A study folder whose store holds groups of another configuration: the message names --restart, which
    `study --help` lists, and --restart then replaces the clashing groups."""
    config = tmp_path / "study.toml"
    text = (f'[model]\nspec = "{tiny_gemma_dir}"\ndtype = "float32"\n[data]\ntasks = ["sentiment"]\nshots = [2]\n'
            "n = {n}\n[geometry]\nn_boot = 5\nn_boot_separability = 2\n[heads]\nenabled = false\n")
    out = tmp_path / "out"
    config.write_text(text.format(n=6))
    assert main(["study", str(config), "--out", str(out), "--no-progress"]) == 0
    (out / "stages.json").unlink()  # e.g. a study whose stages file was lost; the stores stay
    config.write_text(text.format(n=8))
    capsys.readouterr()
    assert main(["study", str(config), "--out", str(out), "--no-progress"]) == 2
    error = capsys.readouterr().err
    flags = set(re.findall(r"--[a-z][a-z-]+", error))
    assert flags == {"--restart", "--out"}, error
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in flags)
    assert main(["study", str(config), "--out", str(out), "--no-progress", "--restart"]) == 0
    from extraction.store import open_group

    assert open_group(out / "stores" / "sentiment.zarr", "icl").sizes["example"] == 8
