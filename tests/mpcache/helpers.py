"""Helpers shared by the MPC model/policy tests: tensor transport out of party processes and a spy on
every opening (``get_plain_text``) of CrypTen's shared tensors."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def to_lists(x):
    """Tensors -> ("tensor", nested lists), recursively (tensors cannot cross the result queue after
    the party exits)."""
    if isinstance(x, torch.Tensor):
        return ("tensor", x.tolist())
    if isinstance(x, dict):
        return {k: to_lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_lists(v) for v in x)
    return x


def to_tensors(x):
    """Inverse of ``to_lists``."""
    if isinstance(x, tuple) and len(x) == 2 and x[0] == "tensor":
        return torch.tensor(x[1])
    if isinstance(x, dict):
        return {k: to_tensors(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_tensors(v) for v in x)
    return x


@contextmanager
def spy_openings(opened: list) -> Iterator[list]:
    """Append ``(dst, shape)`` to ``opened`` for every ``get_plain_text`` of an arithmetic or binary
    shared tensor inside the block (in this party's process)."""
    from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor
    originals = {cls: cls.get_plain_text for cls in (ArithmeticSharedTensor, BinarySharedTensor)}

    def spy(original):
        def get_plain_text(self, dst=None):
            opened.append((dst, tuple(self.size())))
            return original(self, dst=dst)
        return get_plain_text

    for cls, original in originals.items():
        cls.get_plain_text = spy(original)
    try:
        yield opened
    finally:
        for cls, original in originals.items():
            cls.get_plain_text = original
