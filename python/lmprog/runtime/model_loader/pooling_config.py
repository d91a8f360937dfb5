"""How an embedding model turns token states into one vector: read from the model folder's
sentence-transformers files, with the decoder-embedder default when there are none.

    modules.json               which modules run after the transformer (Pooling, Normalize)
    1_Pooling/config.json      pooling_mode_mean_tokens / pooling_mode_cls_token / lasttoken
    sentence_bert_config.json  max_seq_length: the longest input the model was trained on

A folder without them (a decoder such as gte-Qwen2 served with --is-embedding, or a GGUF) pools
the last token and normalizes, which is how decoder embedders are used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

POOLING_KINDS = ("mean", "cls", "last", "all")  # all: every token (token classifiers)
# sentence-transformers' Pooling config keys, in the order it gives them precedence.
_ST_MODES = (
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_lasttoken", "last"),
)


@dataclass(frozen=True)
class PoolingConfig:
    kind: str  # one of POOLING_KINDS
    normalize: bool  # L2-normalize the pooled vector
    max_length: int | None = None  # the model's input limit in tokens, when it declares one

    def __post_init__(self) -> None:
        if self.kind not in POOLING_KINDS:
            raise ValueError(f"pooling must be one of {POOLING_KINDS}, got {self.kind!r}")


DECODER_DEFAULT = PoolingConfig("last", normalize=True)


def read_pooling_config(model_dir: str | Path | None) -> PoolingConfig:
    """The folder's sentence-transformers pooling, or last-token + normalize without one."""
    root = Path(model_dir) if model_dir is not None else None
    if root is None or not root.is_dir() or not (root / "modules.json").is_file():
        return DECODER_DEFAULT
    modules = json.loads((root / "modules.json").read_text())
    kind, normalize = DECODER_DEFAULT.kind, False
    for module in modules:
        kind_name = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind_name == "Pooling":
            kind = _pooling_kind(root / module.get("path", ""), kind)
        elif kind_name == "Normalize":
            normalize = True  # no weights: the folder may not even be shipped
    return PoolingConfig(kind, normalize, _max_length(root))


def _pooling_kind(folder: Path, fallback: str) -> str:
    config_file = folder / "config.json"
    if not config_file.is_file():
        return fallback
    config = json.loads(config_file.read_text())
    for key, kind in _ST_MODES:
        if config.get(key):
            return kind
    modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v)
    raise ValueError(f"{config_file}: pooling {modes} is not supported (mean, cls or last token)")


def _max_length(root: Path) -> int | None:
    st_config = root / "sentence_bert_config.json"
    if not st_config.is_file():
        return None
    value = json.loads(st_config.read_text()).get("max_seq_length")
    return int(value) if value else None
