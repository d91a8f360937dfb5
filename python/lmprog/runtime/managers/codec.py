"""The one codec for messages between processes: io_struct dataclasses as pickle bytes.

Both ends are lmprog processes started together, so pickle's trust model holds (nothing from
the network is unpickled: HTTP bodies are parsed into these dataclasses by the API process).
"""

from __future__ import annotations

import pickle
from typing import Any


def encode(message: Any) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> Any:
    return pickle.loads(data)
