"""The packages' lazy exports give the documented objects, whatever order things are imported in."""

import subprocess
import sys

import pytest

CHECKS = {
    "README order": "from extraction import load_model, extract; import geometry, heads",
    "submodules first": "import extraction.store, heads.pipeline, geometry.sweep; from extraction import extract",
}


@pytest.mark.parametrize("code", CHECKS.values(), ids=CHECKS.keys())
def test_exported_functions_are_not_shadowed_by_submodules(code):
    check = (f"{code}\nimport extraction, geometry, heads\n"
             "assert callable(extract) and callable(extraction.extract), type(extract)\n"
             "assert callable(geometry.transition) and callable(heads.study) and callable(geometry.measure)")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("package", ["extraction", "geometry", "heads"])
def test_no_lazy_export_shares_its_name_with_a_submodule(package):
    """A submodule import binds the package attribute of its name, which would shadow a lazily exported object."""
    import importlib
    import importlib.util

    module = importlib.import_module(package)
    lazy = [name for name in module._EXPORTS if name not in vars(module)]
    assert [name for name in lazy if importlib.util.find_spec(f"{package}.{name}") is not None] == []
