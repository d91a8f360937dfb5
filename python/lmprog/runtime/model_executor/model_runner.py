"""ModelRunner: loads the model, sizes and owns the KV pools, runs one forward per step.

Under tensor parallelism (`tp_size` > 1) there is one ModelRunner per rank, each over its shard
and its own pools of the same size. Rank 0's is the scheduler's: it starts its machine's other
ranks (distributed/tp_worker.py) and sends them each step before running it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import time

import torch

from lmprog.runtime.distributed.parallel_state import (
    SINGLE,
    TpOutOfStepError,
    building_with,
    destroy_tp_group,
    init_tp_group,
)
from lmprog.runtime.distributed.partition import split_attention
from lmprog.runtime.distributed.step_sync import StepSender
from lmprog.runtime.distributed.tp_worker import dead_worker, start_local_workers, with_init_addr
from lmprog.runtime.layers.attention import create_attention_backend
from lmprog.runtime.layers.attention.registry import resolve_backend_name
from lmprog.runtime.layers.kernels import cpu_path
from lmprog.runtime.layers.linear_bf16 import pack_bf16_linears
from lmprog.runtime.layers.quantization import quantize_model
from lmprog.runtime.mem_cache.allocator import TokenToKVPoolAllocator
from lmprog.runtime.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPool
from lmprog.runtime.model_executor.cuda_graph_runner import CudaGraphRunner
from lmprog.runtime.model_executor.forward_batch import ForwardBatch
from lmprog.runtime.model_loader import LoadedModel, load_model
from lmprog.runtime.model_loader.pooling_config import PoolingConfig, read_pooling_config
from lmprog.runtime.models.pooling_model import PoolingModel
from lmprog.runtime.models.pooling_task import PoolingTask
from lmprog.runtime.models.registry import get_model_class
from lmprog.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)


def kv_shape(config: object) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights in place of a checkpoint (`load_format="dummy"`), the same for a given
    seed, model and device: matrices ~ N(0, 0.02) as HF initializes them, norm scales 1,
    biases 0. Drawn on the weights' device (an 8B model's in seconds on a GPU)."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if param.dim() < 2:
            param.fill_(1.0 if "norm" in name else 0.0)
            continue
        gen = gens.setdefault(param.device, torch.Generator(param.device).manual_seed(seed))
        param.normal_(0.0, 0.02, generator=gen)


def check_shardable(cls: type, quantization: str | None, tp_size: int) -> None:
    """Fails when `cls` (or its quantization) cannot be split over `tp_size` ranks."""
    if not hasattr(cls, "checkpoint_shard"):
        raise ValueError(
            f"{cls.__name__} cannot be split across ranks (tp_size {tp_size}): tensor "
            "parallelism covers the Llama family (Llama, Mistral, Qwen2, Qwen3)"
        )
    if quantization == "gguf":
        raise ValueError(
            f"quantization 'gguf' computes from the file's whole blocks and cannot be split "
            f"across ranks (tp_size {tp_size}); use int8 or no quantization"
        )


class ModelRunner:
    def __init__(
        self, server_args: ServerArgs, loaded: LoadedModel | None = None, tp_rank: int = 0
    ) -> None:
        self.server_args = with_init_addr(server_args)
        self.workers: list[mp.Process] = []  # rank 0's: this machine's other ranks
        self.tp, self.step_sender = SINGLE, None
        self.loaded_all = False  # every rank loaded and sized its pools
        self.out_of_step: str | None = None  # why the ranks stopped running in step
        try:
            self._init(loaded, tp_rank)
        except BaseException:
            self.shutdown()
            raise

    def _init(self, loaded: LoadedModel | None, tp_rank: int) -> None:
        server_args = self.server_args
        # The rank's GPU is current before NCCL's group forms (its collectives use it).
        self.device = self._rank_device(server_args.resolved_device, tp_rank)
        if server_args.tp_size > 1:
            self._join_tp(tp_rank)
        self.dtype = server_args.torch_dtype
        if self.device.type == "cpu":
            torch.set_num_threads(server_args.num_threads)
        t0 = time.perf_counter()
        self.loaded = loaded or load_model(server_args.model_path, self.dtype)
        self.config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.model = self._build_model()
        self.load_seconds = time.perf_counter() - t0
        self.model = self._as_pooling_model(self.model)
        self.pooling_task: PoolingTask | None = None
        self.pooling: PoolingConfig | None = None
        if isinstance(self.model, PoolingModel):
            self.pooling_task, self.pooling = self.model.task, self.model.pooler.config
        self.context_len = self._context_len()
        self.vocab_size = int(self.config.vocab_size)
        self._init_pools()
        self.attention_backend = resolve_backend_name(
            server_args.attention_backend, self.device.type
        )
        self.attn_backend = create_attention_backend(self.attention_backend, **self._backend_args())
        self.graph_runner = self._init_cuda_graphs()
        self.loaded_all = True
        logger.info(
            "loaded %s in %.1fs: context %d, KV pool %d tokens, attention %s, CPU path %s%s",
            server_args.model_path,
            self.load_seconds,
            self.context_len,
            self.max_total_tokens,
            self.attention_backend,
            cpu_path(),
            f", tensor-parallel rank {self.tp.rank} of {self.tp.size}" if self.tp.size > 1 else "",
        )

    def _join_tp(self, rank: int) -> None:
        """Starts this machine's other ranks (on rank 0) and joins the group."""
        args = self.server_args
        if rank == 0:
            self.workers = start_local_workers(args)
        self.tp = init_tp_group(
            rank,
            args.tp_size,
            args.dist_init_addr,
            args.resolved_device,
            args.dist_timeout,
            one_machine=args.nnodes == 1,
        )
        if rank == 0:
            self.step_sender = StepSender(self.tp)

    def _rank_device(self, device_type: str, rank: int) -> torch.device:
        """The device of this rank: one GPU per rank of this machine."""
        if device_type != "cuda" or self.server_args.tp_size == 1:
            return torch.device(device_type)
        per_node = self.server_args.tp_size // self.server_args.nnodes
        device = torch.device("cuda", rank % per_node)
        torch.cuda.set_device(device)
        return device

    def dead_worker(self) -> str | None:
        """Why one of this machine's other ranks is gone, or None while they all run."""
        return dead_worker(self.workers)

    def shutdown(self) -> None:
        """Stops the other ranks (rank 0) and leaves the group. Idempotent."""
        # Workers wait for steps only once every rank has loaded; before that they are ended.
        stoppable = self.loaded_all and self.step_sender is not None
        if stoppable and dead_worker(self.workers) is None:
            with contextlib.suppress(RuntimeError):
                self.step_sender.stop()
        self.step_sender = None
        for proc in self.workers:
            proc.join(5 if stoppable else 0)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self.workers = []
        destroy_tp_group(self.tp)
        self.tp = SINGLE

    def _rank_heads(self) -> tuple[int, int, int, int]:
        """(layers, query heads, KV heads, head dim) of this rank's share of the model."""
        layers, kv_heads, head_dim = kv_shape(self.config)
        heads = self.config.num_attention_heads
        split = split_attention(heads, kv_heads, self.tp.rank, self.tp.size)
        return layers, split.heads, split.kv_heads, head_dim

    def _backend_args(self) -> dict[str, object]:
        """What an attention backend is built with: the rank's heads and the pool's layout."""
        _, heads, kv_heads, head_dim = self._rank_heads()
        return {
            "num_heads": heads,
            "num_kv_heads": kv_heads,
            "head_dim": head_dim,
            "dtype": self.dtype,
            "device": self.device,
            "page_size": self.server_args.page_size,
        }

    def _init_cuda_graphs(self) -> CudaGraphRunner | None:
        """Decode-step graphs on CUDA, unless disabled or the backend cannot be captured."""
        args = self.server_args
        if self.device.type != "cuda" or args.disable_cuda_graph or self.pooling is not None:
            return None
        if self.tp.is_sharded:
            logger.info("CUDA graphs off: not yet captured across tensor-parallel ranks")
            return None
        if not self.attn_backend.supports_cuda_graph:
            logger.info(
                "CUDA graphs off: attention backend %s is not capturable", self.attention_backend
            )
            return None
        max_bs = min(args.cuda_graph_max_bs or args.max_running_requests, args.max_running_requests)
        return CudaGraphRunner(self, max_bs)

    def _build_model(self) -> torch.nn.Module:
        cls = get_model_class(list(getattr(self.config, "architectures", None) or []))
        method = self.server_args.quantization
        if self.tp.is_sharded:
            check_shardable(cls, method, self.tp.size)
        with torch.device(self.device), building_with(self.tp):
            model = cls(self.config)
        model = model.to(dtype=self.dtype)
        if self.server_args.load_format == "dummy":
            init_dummy_weights(model, seed=self.tp.rank)
        else:
            model.load_weights(self.loaded.weights(getattr(model, "checkpoint_shard", None)))
        if method is not None:
            if self.device.type != "cpu":
                raise ValueError(f"quantization {method!r} runs on CPU only (sgl_kernel's ops)")
            done = quantize_model(model, method, self.loaded)
            logger.info("quantization %s: %d linear layers", method, len(done))
        elif self.device.type == "cpu" and self.dtype == torch.bfloat16:
            done = pack_bf16_linears(model)
            logger.info("bf16 linear layers packed for sgl_kernel: %d", len(done))
        return model.eval()

    def _as_pooling_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as it is served: classifiers (which declare their `task`) and encoders
        always pool; a decoder pools (embeds) when the runner asks for it, else generates."""
        classifier = hasattr(model, "task")
        always_pools = classifier or getattr(model, "is_encoder", False)
        if always_pools and self.server_args.runner == "generate":
            arch = (getattr(self.config, "architectures", None) or ["?"])[0]
            raise ValueError(
                f"{arch} is a pooling model: it cannot generate (runner='generate'); "
                "serve it with runner='pooling' (or 'auto')"
            )
        if not (always_pools or self.server_args.wants_pooling):
            return model
        if classifier:
            return PoolingModel.classifier(model)
        return PoolingModel.embedder(model, read_pooling_config(self.loaded.source.path))

    @property
    def is_embedding(self) -> bool:
        """A pooling model (SGLang's `is_embedding`): it embeds, classifies or scores tokens
        (`pooling_task` says which), and generates nothing."""
        return self.pooling_task is not None

    @property
    def is_encoder(self) -> bool:
        """Non-causal (BERT): runs in encode mode and keeps no KV."""
        return bool(getattr(self.model, "is_encoder", False))

    def _context_len(self) -> int:
        native = int(getattr(self.config, "max_position_embeddings", 0) or 0)
        if self.pooling is not None and self.pooling.max_length:
            native = min(native or self.pooling.max_length, self.pooling.max_length)
        wanted = self.server_args.max_model_len
        if wanted is None:
            if not native:
                raise ValueError(
                    "the model config has no max_position_embeddings: set max_model_len"
                )
            return native
        return wanted

    def _pool_tokens(self, bytes_per_token: int) -> int:
        args = self.server_args
        if self.is_encoder:
            return 2 * args.page_size  # an encoder keeps no KV; the pool only exists for form
        if args.max_total_tokens is not None:
            return args.max_total_tokens
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1 - args.mem_fraction_static)
        else:
            budget = args.kv_cache_bytes
        tokens = int(budget // bytes_per_token)
        if tokens < args.page_size * 2:
            raise ValueError(
                f"KV budget of {int(budget)} bytes holds {tokens} tokens at {bytes_per_token} "
                "bytes per token; raise kv_cache_bytes / mem_fraction_static"
            )
        return tokens

    def _init_pools(self) -> None:
        args = self.server_args
        layers, _, kv_heads, head_dim = self._rank_heads()
        bpt = TokenToKVPool.bytes_per_token(layers, kv_heads, head_dim, self.dtype)
        # Every rank's pool has the same slots (rank 0 hands them out): what all can hold.
        tokens = self.tp.min_int(self._pool_tokens(bpt))
        self.allocator = TokenToKVPoolAllocator(tokens, args.page_size)
        self.max_total_tokens = self.allocator.size
        self.token_to_kv_pool = TokenToKVPool(
            self.max_total_tokens,
            args.page_size,
            layers,
            kv_heads,
            head_dim,
            self.dtype,
            self.device,
        )
        self.req_to_token_pool = ReqToTokenPool(
            args.max_running_requests, self.context_len, self.device
        )
        if self.step_sender is not None:  # the other ranks replay what changes the pools
            self.req_to_token_pool.journal = self.step_sender.journal
            self.token_to_kv_pool.journal = self.step_sender.journal

    @torch.inference_mode()
    def forward(self, forward_batch: ForwardBatch) -> torch.Tensor:
        """Runs the model on one step: float32 logits of the requested rows, or for a pooling
        model its float32 outputs ([B, out]; [T, out] for a per-token task)."""
        forward_batch.req_to_token_pool = self.req_to_token_pool
        forward_batch.token_to_kv_pool = self.token_to_kv_pool
        forward_batch.attn_backend = self.attn_backend
        if self.step_sender is not None:
            return self._forward_sharded(forward_batch)
        return self._run(forward_batch)

    def _forward_sharded(self, forward_batch: ForwardBatch) -> torch.Tensor:
        """Rank 0: sends the step to the other ranks, then runs its part. Any failure leaves
        the ranks out of step: this and every later step raise TpOutOfStepError."""
        if self.out_of_step is not None:
            raise TpOutOfStepError(self.out_of_step)
        try:
            if (why := self.dead_worker()) is not None:
                raise RuntimeError(why)
            self.step_sender.send(forward_batch)
            return self._run(forward_batch)
        except Exception as e:
            self.out_of_step = f"tensor parallelism: a step failed on rank 0: {e}"
            raise TpOutOfStepError(self.out_of_step) from e

    def _run(self, forward_batch: ForwardBatch) -> torch.Tensor:
        if self.graph_runner is not None and self.graph_runner.can_run(forward_batch):
            return self.graph_runner.replay(forward_batch)
        self.attn_backend.init_forward_metadata(forward_batch)
        return self.model(forward_batch)
