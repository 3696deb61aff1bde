"""Where each rank computes (``--device cuda``). The parties still talk gloo over TCP.

Party ``r`` gets ``cuda:{r % device_count}`` (two parties share one GPU on a one-GPU host); the
dealer gets the GPU after the parties' when the host has one to spare, else the CPU.
"""
from __future__ import annotations

import torch


def party_device(rank: int, device: str = "cpu", device_count: int | None = None,
                 n_parties: int = 2) -> torch.device:
    """The torch device of ``rank``; ``device_count`` defaults to ``torch.cuda.device_count()``."""
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    count = torch.cuda.device_count() if device_count is None else device_count
    if count < 1:
        raise ValueError("--device cuda but no CUDA device is visible to this process")
    if rank < n_parties:
        return torch.device("cuda", rank % count)
    return torch.device("cuda", n_parties) if count > n_parties else torch.device("cpu")
