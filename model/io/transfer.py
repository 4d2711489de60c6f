"""Host tensors onto the device without making the host wait for the device's queued work."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """`t` on `device`. A host tensor goes to CUDA through pinned memory as a queued copy: a plain `.to("cuda")`
    synchronizes the stream first, which would make the engine's prefill wait for the decode steps queued before it."""
    if device is None:
        return t
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
