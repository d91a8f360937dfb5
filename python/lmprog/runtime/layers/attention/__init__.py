"""Attention backends behind one interface; models call `RadixAttention` and never know which."""

from lmprog.runtime.layers.attention.base import AttentionBackend, RadixAttention
from lmprog.runtime.layers.attention.registry import create_attention_backend, supported_backends

__all__ = ["AttentionBackend", "RadixAttention", "create_attention_backend", "supported_backends"]
