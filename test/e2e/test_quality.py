"""The lossy weight formats predict a fixed English text almost as well as fp32 does.

Quality is the mean log-likelihood per token of benchmarks/data/quality_text.txt (written for this
repository, ~2,400 tokens; see benchmarks/quality.py). Targets, relative to fp32: bf16 within 1%,
int8 within 3%, gguf within 0.5%. The default model comes from a Q4_1 GGUF, so fp32 is that file
dequantized: gguf (computing from the file's blocks) is held to the tightest target.
`benchmarks/bench_quality.py` prints the same numbers as a table.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

QUALITY_PY = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"

# Each lossy configuration: its engine keywords.
CONFIGS = {
    "bf16": {"dtype": "bfloat16"},
    "int8": {"dtype": "float32", "quantization": "int8"},
    "gguf": {"dtype": "float32", "quantization": "gguf"},
}


def _load_quality() -> ModuleType:
    """benchmarks/quality.py, loaded by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("lmprog_bench_quality", QUALITY_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


quality = _load_quality()


@pytest.fixture(scope="module")
def fp32_score(llm):
    """The reference: the session's fp32 engine on the quality text."""
    return quality.score_text(llm)


def test_quality_text_is_long_enough(fp32_score) -> None:
    assert 2000 <= fp32_score.tokens < 4000, f"the quality text has {fp32_score.tokens} tokens"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lossy_format_keeps_mean_loglik_near_fp32(name: str, fp32_score, engine_factory) -> None:
    config = CONFIGS[name]
    if "quantization" in config:
        pytest.importorskip(
            "sgl_kernel", reason=f"quantization={config['quantization']} needs sgl_kernel's ops"
        )
    # A small KV pool: it only has to hold the text (the default budget is 2 GiB per engine).
    engine = engine_factory(seed=0, max_total_tokens=4096, **config)
    score = quality.score_text(engine)
    assert score.tokens == fp32_score.tokens
    diff = quality.relative_difference(score.mean_loglik, fp32_score.mean_loglik)
    target = quality.TARGETS[name]
    assert abs(diff) <= target, (
        f"{name}: mean loglik {score.mean_loglik:.4f} vs fp32 {fp32_score.mean_loglik:.4f}, "
        f"{100 * diff:+.3f}%; the target is within {100 * target:g}%"
    )
