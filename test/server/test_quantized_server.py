"""`--quantization gguf` as a user runs it: the server computes from the GGUF's blocks, serves
chat through the official client, says what it runs, and refuses what it cannot do."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests
from conftest import ROOT, start_server

pytest.importorskip("sgl_kernel", reason="sgl_kernel is not built (scripts/setup.sh)")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def gguf_server():
    return start_server("--quantization", "gguf", "--max-total-tokens", "4096")


def test_serves_chat_from_the_blocks(gguf_server) -> None:
    client = openai.OpenAI(base_url=f"{gguf_server.url}/v1", api_key="none")
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "Name a colour of the sky."}],
        max_tokens=12,
        temperature=0,
    )
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0
    info = requests.get(f"{gguf_server.url}/get_server_info", timeout=30).json()
    assert info["server_args"]["quantization"] == "gguf"
    assert info["cpu_path"] != "torch"


def test_gguf_needs_a_gguf_model(tmp_path) -> None:
    """A folder model has no blocks: the server exits at once, naming the problem."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmprog.runtime.model_loader import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct"))

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmprog.launch_server",
            "--model-path",
            str(tmp_path),
            "--quantization",
            "gguf",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={"PYTHONPATH": str(ROOT / "python"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode != 0
    assert "quantization 'gguf'" in done.stderr and ".gguf" in done.stderr, done.stderr[-2000:]
