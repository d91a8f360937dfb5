"""Process-wide settings of the frontend: `lmprog.global_config` (SGLang's `sgl.global_config`).

Only the settings lmprog acts on exist. Setting any other name fails rather than being kept and
ignored, so a program tuning an SGLang knob lmprog lacks learns so at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class GlobalConfig:
    default_backend: Any = None  # set_default_backend(...): used where no backend is given
    verbosity: int = 0  # 2 or more: print each program's text when its run ends
    enable_precache_with_tracing: bool = True  # run_batch prefills the traced constant prefix

    def __setattr__(self, name: str, value: Any) -> None:
        names = [f.name for f in dataclasses.fields(self)]
        if name not in names:
            raise AttributeError(
                f"lmprog's global_config has no setting {name!r}; it has {', '.join(names)}"
            )
        object.__setattr__(self, name, value)


global_config = GlobalConfig()


def resolve_backend(backend: Any = None) -> Any:
    """`backend`, else the default one; a Runtime serves through its endpoint."""
    backend = backend or global_config.default_backend
    if backend is None:
        raise ValueError(
            "no backend: call set_default_backend(RuntimeEndpoint(url)) or pass backend=..."
        )
    return getattr(backend, "endpoint", backend)
