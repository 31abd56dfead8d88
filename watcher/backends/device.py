"""Pick the torch device and dtype a backend runs on: cuda > mps > cpu unless configured."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    device: str
    dtype: torch.dtype

    def describe(self) -> str:
        """Device, dtype and memory in use, for the start-up log line."""
        text = f"{self.device} {str(self.dtype).removeprefix('torch.')}"
        if self.device.startswith("cuda") and torch.cuda.is_available():
            used = torch.cuda.memory_allocated(self.device) / 2**30
            total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
            text += f", {used:.1f} of {total:.1f} GiB GPU memory in use"
        return text


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick(device: str = "auto", dtype: str = "auto") -> Placement:
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if dtype == "auto":
        if device.startswith("cuda"):
            chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif device == "mps":
            chosen = torch.float16
        else:
            # bf16 matmuls on CPU are slow and change results; float32 is the safe default.
            chosen = torch.float32
    else:
        chosen = _DTYPES[dtype]
    return Placement(device, chosen)


def free_memory(device: str) -> None:
    """After a model is dropped: collect it, then hand its cached memory back to the GPU."""
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()
