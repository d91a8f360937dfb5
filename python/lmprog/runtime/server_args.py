"""ServerArgs: every engine and server setting, in one frozen dataclass.

The offline `LLM(...)` takes the same names as keywords; `python -m lmprog.launch_server` builds its
command-line flags from the fields (`max_total_tokens` -> `--max-total-tokens`). Values derived from
the machine (device, dtype, thread count) are resolved by properties, not stored twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ServerArgs:
    model_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "Alias, local HF folder, .gguf file or hub id of the model."},
    )
    tokenizer_path: str | None = field(
        default=None, metadata={"help": "Tokenizer location, if not the model's own."}
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "Model name in the API (default: model_path)."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto (bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16, else "
            "float32), float32, bfloat16, float16."
        },
    )
    load_format: str = field(
        default="auto",
        metadata={
            "help": "auto (the checkpoint's weights) or dummy (random weights of the config's "
            "shapes, for speed tests of models one cannot download)."
        },
    )
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "Quantized weights (CPU, needs sgl_kernel): int8 (weight-only, per "
            "channel) or gguf (a .gguf model's Q4_0/Q4_1/Q8_0 blocks used as they are)."
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    max_model_len: int | None = field(
        default=None,
        metadata={"help": "Context length (prompt + output); default: the model's own."},
    )
    max_total_tokens: int | None = field(
        default=None, metadata={"help": "KV pool size in tokens (overrides the byte budget)."}
    )
    kv_cache_bytes: int = field(
        default=2 << 30, metadata={"help": "CPU: the KV pool's byte budget (default 2 GiB)."}
    )
    mem_fraction_static: float = field(
        default=0.85,
        metadata={"help": "CUDA: fraction of GPU memory for weights + KV pool."},
    )
    page_size: int = field(default=1, metadata={"help": "Tokens per KV page."})
    max_running_requests: int = field(
        default=256, metadata={"help": "Most sequences decoding at once."}
    )
    max_prefill_tokens: int = field(
        default=8192, metadata={"help": "Token budget of one prefill batch."}
    )
    chunked_prefill_size: int = field(
        default=2048,
        metadata={"help": "Longest prompt chunk prefilled in one step; -1 disables chunking."},
    )
    schedule_policy: str = field(
        default="fcfs",
        metadata={"help": "Waiting-queue order: fcfs, lpm (longest cached prefix), dfs-weight."},
    )
    disable_radix_cache: bool = field(
        default=False, metadata={"help": "Reuse no KV across requests (no prefix cache)."}
    )
    is_embedding: bool = field(
        default=False,
        metadata={
            "help": "Serve the model as a pooling model (as --runner pooling): its architecture "
            "decides the task. *ForSequenceClassification classifies (/classify, /v1/score, "
            "/v1/rerank, /pooling), *ForTokenClassification scores each token (/pooling), any "
            "other embeds (/v1/embeddings, /encode, /v1/score, /v1/rerank; a decoder pools its "
            "last token). Encoders (BERT) and classifiers pool without this flag."
        },
    )
    runner: str = field(
        default="auto",
        metadata={
            "help": "vLLM's name for the same choice: auto (classifiers and encoders pool, "
            "decoders generate), generate, or pooling (like --is-embedding)."
        },
    )
    disable_jump_forward: bool = field(
        default=False,
        metadata={"help": "Sample every token of constrained outputs, even forced ones."},
    )
    grammar_cache_size: int = field(
        default=256,
        metadata={
            "help": "Compiled grammars (regex, JSON schema, EBNF) kept, least recently used "
            "out first."
        },
    )
    tool_call_parser: str | None = field(
        default=None,
        metadata={
            "help": "Server: the format the model writes tool calls in, read into OpenAI "
            "tool_calls on /v1/chat/completions (and enforced for tool_choice required or a "
            "named function): hermes (Qwen2.5/Qwen3, Hermes; also named qwen25, qwen), "
            "llama3_json (Llama 3.1-3.3; also llama3), mistral. Unset: chat requests may "
            "carry tools only with tool_choice none."
        },
    )
    reasoning_parser: str | None = field(
        default=None,
        metadata={
            "help": "Server: split the thinking of a reasoning model off its chat replies into "
            "reasoning_content: qwen3 (thinks when the reply starts with <think>), deepseek-r1, "
            "qwen3-thinking, step3 (the template opens the thinking), kimi."
        },
    )
    attention_backend: str = field(
        default="auto",
        metadata={
            "help": "Attention implementation: auto (the best the device offers: on CPU cpu "
            "when sgl_kernel is installed, else torch_native; on CUDA flashinfer when it is "
            "installed, else triton), cpu (sgl_kernel's paged kernels), flashinfer (FlashInfer's "
            "paged kernels, CUDA), triton (Triton kernels for extend and decode, for GPUs; "
            "power-of-two head dims), torch_native (the torch reference)."
        },
    )
    cuda_graph_max_bs: int | None = field(
        default=None,
        metadata={
            "help": "CUDA: largest decode batch run through a captured CUDA graph (default: "
            "max_running_requests); larger batches run eagerly."
        },
    )
    disable_cuda_graph: bool = field(
        default=False, metadata={"help": "CUDA: run decode steps eagerly, without CUDA graphs."}
    )
    seed: int | None = field(
        default=None, metadata={"help": "Seed of the engine's RNG (unseeded requests draw here)."}
    )
    cpu_threads: int | None = field(
        default=None, metadata={"help": "torch threads for the model on CPU (default: all cores)."}
    )
    max_logprobs: int = field(default=20, metadata={"help": "Most top logprobs per token."})
    host: str = field(default="127.0.0.1", metadata={"help": "Server: address to listen on."})
    port: int = field(default=30000, metadata={"help": "Server: port to listen on."})
    dp_size: int = field(
        default=1,
        metadata={
            "help": "Server: data-parallel replicas. N > 1 starts N servers on local ports (each "
            "with cores // N CPU threads unless --cpu-threads says) behind a cache-aware router "
            "on --host/--port (python -m lmprog.router offers the other policies)."
        },
    )
    tp_size: int = field(
        default=1,
        metadata={
            "help": "Tensor-parallel ranks: the model's heads, MLP columns and vocabulary split "
            "over N processes (gloo on CPU, NCCL on CUDA: one GPU each), which must divide the "
            "model's attention heads. On CPU each rank gets cores // N threads."
        },
    )
    nnodes: int = field(
        default=1,
        metadata={"help": "Machines the tensor-parallel ranks span (tp_size / nnodes each)."},
    )
    node_rank: int = field(
        default=0,
        metadata={
            "help": "This machine's index among nnodes; 0 serves HTTP, the others only run "
            "their ranks."
        },
    )
    dist_init_addr: str | None = field(
        default=None,
        metadata={
            "help": "host:port where the ranks meet (node 0's address; required with "
            "nnodes > 1; default: a free local port)."
        },
    )
    dist_timeout: int = field(
        default=600,
        metadata={"help": "Seconds the ranks wait for each other to start (and per step)."},
    )
    api_key: str | None = field(
        default=None,
        metadata={
            "help": "Server: require 'Authorization: Bearer KEY' on /v1/* and control routes."
        },
    )
    max_queued_requests: int | None = field(
        default=None,
        metadata={
            "help": "Server: most requests waiting to run; more get 503 (default: no limit)."
        },
    )
    max_request_bytes: int = field(
        default=16 << 20, metadata={"help": "Server: largest request body (default 16 MiB)."}
    )
    disable_dashboard: bool = field(
        default=False, metadata={"help": "Server: no live dashboard at GET /dashboard."}
    )
    dashboard_hide_prompts: bool = field(
        default=False,
        metadata={"help": "Server: the dashboard shows no prompt text (tree edges, requests)."},
    )
    debug_checks: bool = field(
        default=False,
        metadata={"help": "Check KV accounting and the prefix cache whenever the engine idles."},
    )

    def __post_init__(self) -> None:
        checks = [
            ("page_size", self.page_size >= 1, ">= 1"),
            ("max_running_requests", self.max_running_requests >= 1, ">= 1"),
            ("max_prefill_tokens", self.max_prefill_tokens >= 1, ">= 1"),
            ("kv_cache_bytes", self.kv_cache_bytes > 0, "> 0"),
            ("port", 0 <= self.port < 65536, "in [0, 65536)"),
            ("dp_size", self.dp_size >= 1, ">= 1"),
            ("tp_size", self.tp_size >= 1, ">= 1"),
            (
                "nnodes",
                self.nnodes >= 1 and self.tp_size % self.nnodes == 0,
                f">= 1 and divide tp_size ({self.tp_size})",
            ),
            ("node_rank", 0 <= self.node_rank < self.nnodes, f"in [0, nnodes={self.nnodes})"),
            (
                "dist_init_addr",
                self.nnodes == 1 or _is_host_port(self.dist_init_addr),
                "host:port (node 0's address) when nnodes > 1",
            ),
            ("dist_timeout", self.dist_timeout >= 1, ">= 1"),
            ("max_request_bytes", self.max_request_bytes > 0, "> 0"),
            ("grammar_cache_size", self.grammar_cache_size >= 1, ">= 1"),
            ("mem_fraction_static", 0 < self.mem_fraction_static <= 1, "in (0, 1]"),
            (
                "cuda_graph_max_bs",
                self.cuda_graph_max_bs is None or self.cuda_graph_max_bs >= 1,
                ">= 1 (or unset)",
            ),
            (
                "dtype",
                self.dtype in ("auto", "float32", "bfloat16", "float16"),
                "one of auto, float32, bfloat16, float16",
            ),
            (
                "quantization",
                self.quantization in (None, "int8", "gguf"),
                "one of int8, gguf (or unset)",
            ),
            ("device", self.device in ("auto", "cpu", "cuda"), "one of auto, cpu, cuda"),
            ("load_format", self.load_format in ("auto", "dummy"), "one of auto, dummy"),
            (
                "runner",
                self.runner in ("auto", "generate", "pooling"),
                "one of auto, generate, pooling",
            ),
            (
                "schedule_policy",
                self.schedule_policy in ("fcfs", "lpm", "dfs-weight"),
                "one of fcfs, lpm, dfs-weight",
            ),
            (
                "chunked_prefill_size",
                self.chunked_prefill_size == -1 or self.chunked_prefill_size >= self.page_size,
                f"-1 (off) or >= page_size ({self.page_size})",
            ),
        ]
        checks += _parser_checks(self.tool_call_parser, self.reasoning_parser)
        if self.max_total_tokens is not None:
            checks.append(("max_total_tokens", self.max_total_tokens >= 1, ">= 1"))
        if self.max_model_len is not None:
            checks.append(("max_model_len", self.max_model_len >= 2, ">= 2"))
        for name, ok, limit in checks:
            if not ok:
                raise ValueError(f"{name} must be {limit}, got {getattr(self, name)!r}")

    # ---- derived values -------------------------------------------------------------------
    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def torch_dtype(self) -> Any:
        import torch

        if self.dtype == "auto":
            if self.resolved_device == "cuda":
                return torch.bfloat16
            from lmprog.runtime.cpu_dtype import auto_cpu_dtype

            return auto_cpu_dtype()
        return getattr(torch, self.dtype)

    @property
    def wants_pooling(self) -> bool:
        """Pool even a decoder that could generate (--is-embedding / --runner pooling)."""
        return self.is_embedding or self.runner == "pooling"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_path

    @property
    def num_threads(self) -> int:
        """torch threads of one model rank: cpu_threads, else the cores this machine's
        tensor-parallel ranks share."""
        ranks_here = self.tp_size // self.nnodes
        return self.cpu_threads or max(1, len(os.sched_getaffinity(0)) // ranks_here)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ServerArgs:
        """Builds from keywords, failing on unknown names with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> ServerArgs:
        return dataclasses.replace(self, **changes)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """One `--flag-name` per field, typed and documented from the field itself."""
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            if f.type in ("bool", bool):
                parser.add_argument(flag, action="store_true", help=help_text)
                continue
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> ServerArgs:
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})


def _is_host_port(addr: str | None) -> bool:
    host, _, port = (addr or "").rpartition(":")
    return bool(host) and port.isdigit()


def _parser_checks(tool_call_parser: str | None, reasoning_parser: str | None) -> list:
    from lmprog.lang.reasoning import FORMATS
    from lmprog.runtime.entrypoints.tool_parsers import TOOL_PARSER_NAMES

    return [
        (
            "tool_call_parser",
            tool_call_parser is None or tool_call_parser in TOOL_PARSER_NAMES,
            f"one of {', '.join(TOOL_PARSER_NAMES)} (or unset)",
        ),
        (
            "reasoning_parser",
            reasoning_parser is None or reasoning_parser in FORMATS,
            f"one of {', '.join(FORMATS)} (or unset)",
        ),
    ]
