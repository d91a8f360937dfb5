"""Turn what the user typed (alias, path, hub id) into a `ModelSource` on local disk.

Order of resolution, first match wins:
  1. an alias from `aliases.ALIASES` (case-insensitive);
  2. an existing path: a .gguf file, a folder with config.json and weights, or a folder holding
     exactly one .gguf file;
  3. something shaped like a hub id ("org/name"): `huggingface_hub.snapshot_download` of its
     configs, tokenizer files and safetensors (from the local HF cache when offline);
  4. anything else is a ValueError that says which of these it failed and lists the aliases.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass

from lmprog.runtime.model_loader.aliases import ALIASES, alias_path, describe_aliases, find_alias

# Files a hub download fetches: configs, tokenizers, chat templates, safetensors weights.
HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.tiktoken",
]
# Mistral-style repos ship the weights twice; `consolidated` is the non-HF copy.
HUB_IGNORE_PATTERNS = ["consolidated*", "original/*"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """What a model spec resolved to."""

    spec: str  # what the user gave ("smollm2-135m-instruct", a path, a hub id)
    kind: str  # "gguf" | "folder"
    path: str  # the .gguf file, or the local folder (after a hub download: the snapshot folder)


def resolve_model(spec: str) -> ModelSource:
    """Resolve an alias, a local .gguf file or HF folder, or a hub id; see the module docstring."""
    alias = find_alias(spec)
    if alias is not None:
        return ModelSource(spec=spec, kind=alias.kind, path=alias_path(alias))
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        return _local_source(spec, os.path.abspath(path))
    if _looks_like_hub_id(spec):
        return ModelSource(spec=spec, kind="folder", path=_download(spec))
    raise ValueError(_not_found_message(spec))


def weight_files(folder: str) -> list[str]:
    """The weight files of an HF folder: safetensors (per the index if there is one), else .bin."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, n) for n in names]
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return [os.path.join(folder, "model.safetensors")]
    for suffix in (".safetensors", ".bin"):
        names = sorted(
            n
            for n in os.listdir(folder)
            if n.endswith(suffix) and (suffix == ".safetensors" or n.startswith("pytorch_model"))
        )
        if names:
            return [os.path.join(folder, n) for n in names]
    return []


def _local_source(spec: str, path: str) -> ModelSource:
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(
                f"model file {path} is not a .gguf file; pass a .gguf file or an HF model folder "
                "(config.json + *.safetensors)"
            )
        return ModelSource(spec=spec, kind="gguf", path=path)
    if os.path.isfile(os.path.join(path, "config.json")):
        # Its weights are looked for when they are read (folder_loader.py): a folder without
        # any serves load_format="dummy".
        return ModelSource(spec=spec, kind="folder", path=path)
    ggufs = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
    if len(ggufs) == 1:
        return ModelSource(spec=spec, kind="gguf", path=os.path.join(path, ggufs[0]))
    what = f"{len(ggufs)} .gguf files ({', '.join(ggufs)}); pass one" if ggufs else "no config.json"
    raise ValueError(f"model folder {path} has {what}")


def _looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and ".." not in spec and not spec.endswith(".gguf")


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so a later setenv counts.
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return value in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def _download(repo_id: str) -> str:
    """Snapshot a hub repo's config, tokenizer and safetensors; return the local folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _hub_offline()
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=HUB_ALLOW_PATTERNS,
            ignore_patterns=HUB_IGNORE_PATTERNS,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError as e:
        # Raised both in offline mode and when the hub can't be reached, once the local HF cache
        # has no snapshot of this repo either.
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "the hub is unreachable"
        raise ValueError(
            f"model {repo_id!r} is not a local path or a model alias, and it could not be "
            f"downloaded because {why} and the local Hugging Face cache has no copy ({e}).\n"
            f"Pass a local .gguf file or model folder, or one of the aliases:\n{describe_aliases()}"
        ) from e
    except GatedRepoError as e:
        raise ValueError(
            f"model {repo_id!r} is gated on the hub: accept its license there and log in "
            f"(`hf auth login`) first ({e})"
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ValueError(
            f"model {repo_id!r} is not a local path, a model alias, or a hub repo you can access "
            f"({e}).\nAliases:\n{describe_aliases()}"
        ) from e
    if not os.path.isfile(os.path.join(folder, "config.json")) or not weight_files(folder):
        raise ValueError(
            f"hub repo {repo_id!r} has no config.json + *.safetensors (GGUF-only repos: download "
            f"the .gguf file and pass its path); got {sorted(os.listdir(folder))}"
        )
    return folder


def _not_found_message(spec: str) -> str:
    close = difflib.get_close_matches(spec.lower(), list(ALIASES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"model {spec!r} is not a model alias, an existing path, or a hub id (org/name): "
        f"no such file or folder {os.path.abspath(os.path.expanduser(spec))}.{hint}\n"
        f"Aliases:\n{describe_aliases()}"
    )
