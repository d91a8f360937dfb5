"""Process-wide settings of the frontend: the default backend (set_default_backend)."""

from __future__ import annotations

from typing import Any

default_backend: Any = None


def resolve_backend(backend: Any = None) -> Any:
    """`backend`, else the default one; a Runtime serves through its endpoint."""
    backend = backend or default_backend
    if backend is None:
        raise ValueError(
            "no backend: call set_default_backend(RuntimeEndpoint(url)) or pass backend=..."
        )
    return getattr(backend, "endpoint", backend)
