"""Small host values (per-row parameters, row indices, masks) onto the device
without the host waiting: a blocking copy (`torch.tensor(..., device=...)`)
makes torch synchronize the stream, which on a GPU would stall the host
until the step's forward pass ends."""

from __future__ import annotations

import torch


def to_device(values: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a `dtype` tensor on `device`, through pinned memory on a GPU."""
    staged = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return staged
    # Only a tensor handed in can be pinned already (the grammar bitmask); a list never is.
    if not (isinstance(values, torch.Tensor) and staged.is_pinned()):
        staged = staged.pin_memory()
    return staged.to(device, non_blocking=True)
