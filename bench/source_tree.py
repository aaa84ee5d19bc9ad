"""Run colocate from this checkout without installing it (a lent GPU machine has no
network, and an editable install needs setuptools to build).

pyproject.toml installs kernels/ as colocate.kernels; from a bare source tree that
package does not exist, so it is registered here from kernels/ before anything
imports it. An installed colocate (tests, make install) is used as it is.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def use_source_tree() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if importlib.util.find_spec("colocate.kernels") is not None:
        return
    import colocate

    init = ROOT / "kernels" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "colocate.kernels", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["colocate.kernels"] = module
    colocate.kernels = module
    spec.loader.exec_module(module)
