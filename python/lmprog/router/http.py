"""The router's HTTP client library: httpx, or its API-compatible fork where only that is installed
(`httpx2`, which the openai and huggingface_hub packages pull in on some machines)."""

from __future__ import annotations

try:
    import httpx
except ImportError:
    import httpx2 as httpx  # type: ignore[no-redef]

__all__ = ["httpx"]
