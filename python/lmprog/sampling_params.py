"""`from lmprog.sampling_params import SamplingParams, RequestOutputKind`, as vLLM users import
them from `vllm.sampling_params` (no torch)."""

from lmprog.runtime.sampling.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["RequestOutputKind", "SamplingParams"]
