"""Host-to-device copies that do not stall the host.

A copy from ordinary (pageable) host memory makes CUDA wait for the stream to drain first: the
host then sits idle while the GPU finishes the last step, and the next step's launches start
late. From pinned memory the copy is queued like a kernel. So per-step inputs are built on the
host, packed into one pinned tensor and sent in one copy (`to_device_packed`); on CPU devices
both functions are plain tensor constructions.
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`; for CUDA through pinned memory, without a sync."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def to_device_packed(
    rows: list[list[int] | list[float] | torch.Tensor], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Each of `rows` (lists or 1-D CPU tensors) as a `dtype` tensor on `device`, sent in one
    copy: views of one packed buffer."""
    parts = [
        r.to(dtype) if isinstance(r, torch.Tensor) else torch.tensor(r, dtype=dtype) for r in rows
    ]
    packed = to_device(torch.cat(parts) if parts else torch.empty(0, dtype=dtype), device)
    return list(packed.split([p.numel() for p in parts]))
