"""Process-wide settings of the frontend: the default backend (set_default_backend)."""

from __future__ import annotations

from typing import Any

default_backend: Any = None
