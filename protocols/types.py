"""Type aliases that make secrecy visible in signatures.

``Secret``: a CrypTen shared tensor (``[x]`` in docstrings). ``Public``: a plaintext torch tensor or
int known to every party (shapes, budgets, positions, public constants).
"""
from __future__ import annotations

from typing import Union

import torch

from protocols.compat import MPCTensor

Secret = MPCTensor
Public = Union[torch.Tensor, int, float]

__all__ = ["Secret", "Public"]
