"""The one place that imports CrypTen.

CrypTen 0.4.1 (the last PyPI release) does ``from torch.onnx._internal.registration import
registry`` and ``import onnx`` at import time, both only for its ONNX model converter, which we never
use. On torch >= 2.x the first module is gone and onnx is usually absent, so ``import crypten`` fails.
We register stub modules for them *with real module specs* (a spec-less stub makes
``importlib.util.find_spec`` raise inside ``torch._dynamo``/transformers) and then import CrypTen.

Every module of ours gets CrypTen from here: ``from protocols.compat import crypten``.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

import torch


def _stub(name: str, **attrs: object) -> None:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def _install_stubs() -> None:
    try:
        importlib.import_module("torch.onnx._internal.registration")
    except ImportError:
        _stub("torch.onnx._internal.registration", registry=None)
    if importlib.util.find_spec("onnx") is None:
        _stub("onnx")
        _stub("onnx.numpy_helper")


_install_stubs()
import crypten  # noqa: E402  (must follow the stubs)
import crypten.communicator as comm  # noqa: E402
from crypten.mpc import MPCTensor  # noqa: E402

__all__ = ["crypten", "comm", "MPCTensor"]


def _patch_cuda_long_tensor() -> None:
    """Make CrypTen's CUDA share wrapper work under torch >= 2.x's ``__torch_function__`` protocol.

    CrypTen 0.4.1 defines ``CUDALongTensor.__torch_function__`` as a plain method that unwraps only
    top-level arguments, so ``torch.cat([a, b])`` / ``torch.stack`` on CUDA shares re-dispatch to
    it forever (RecursionError). This replacement is a classmethod that unwraps nested lists and
    tuples and keeps CrypTen's own handlers; CPU shares are plain tensors and never get here.
    """
    from crypten.cuda import cuda_tensor as ct

    def unwrap(x):
        if isinstance(x, ct.CUDALongTensor):
            return x.tensor()
        if isinstance(x, (list, tuple)):
            return type(x)(unwrap(t) for t in x)
        return x

    def wrap(r):
        if torch.is_tensor(r):
            return ct.CUDALongTensor(r)
        if isinstance(r, (list, tuple)):
            return type(r)(wrap(t) for t in r)
        return r

    def torch_function(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in ct.HANDLED_FUNCTIONS and all(issubclass(t, (torch.Tensor, ct.CUDALongTensor)) for t in types):
            return ct.HANDLED_FUNCTIONS[func](*args, **kwargs)
        return wrap(func(*unwrap(args), **{k: unwrap(v) for k, v in kwargs.items()}))

    ct.CUDALongTensor.__torch_function__ = classmethod(torch_function)


_patch_cuda_long_tensor()


def _patch_decoder() -> None:
    """Decode fixed point exactly: ``v = ⌊t / s⌋ + (t mod s) / s``.

    CrypTen 0.4.1's ``FixedPointEncoder.decode`` divides negative integers by ``s − 1`` instead of
    ``s``, so a revealed value below −1 is off by exactly 1 whenever its remainder falls in a window
    that grows with |v| (seen as a reproducible error of 1.0 in ``q·Kᵀ``). Only revealing is affected.
    """
    from crypten.encoder import FixedPointEncoder, nearest_integer_division

    def decode(self, tensor):
        if tensor is None:
            return None
        scale = self._scale
        if scale > 1:
            whole = tensor.div(scale, rounding_mode="floor")
            return (whole.float() + (tensor - whole * scale).float() / scale).data
        return nearest_integer_division(tensor, scale).data

    FixedPointEncoder.decode = decode


_patch_decoder()


def _patch_truncation() -> None:
    """2-party division by a public integer follows ``ProtocolConfig.truncation``.

    ``"exact"`` (default): ``protocols.truncation.exact_div_`` (1 round, no wrap errors); ``"local"``:
    CrypTen's local share truncation. More than 2 parties keep CrypTen's own protocol.
    """
    from crypten.common.tensor_types import is_float_tensor, is_int_tensor
    from crypten.mpc.primitives import ArithmeticSharedTensor

    stock = ArithmeticSharedTensor.div_

    def div_(self, y):
        if isinstance(y, float) and int(y) == y:
            y = int(y)
        if is_float_tensor(y) and y.frac().eq(0).all():
            y = y.long()
        if (isinstance(y, int) or is_int_tensor(y)) and comm.get().get_world_size() == 2 \
                and not crypten.cfg.debug.validation_mode:
            from protocols import truncation
            from protocols.config import active_config
            if active_config().truncation == "exact":
                return truncation.exact_div_(self, y)
            return truncation.local_div_(self, y)
        return stock(self, y)

    ArithmeticSharedTensor.div_ = div_


_patch_truncation()
