"""Shared fixtures for protocol tests: run a job on real parties under TFP or the separate dealer."""
from __future__ import annotations

import random
from typing import Any, Callable

import pytest

from launch.local import run_parties
from protocols.dealer import serve

PROVIDERS = ("TFP", "dealer")


def run_on(provider: str, fn: Callable, *args: Any, timeout: float = 120.0) -> list[Any]:
    """``run_parties`` with two parties under TFP, or two parties + ``protocols.dealer.serve``."""
    if provider == "dealer":
        return run_parties(fn, *args, dealer=True, dealer_main=serve, timeout=timeout)
    return run_parties(fn, *args, timeout=timeout)


@pytest.fixture(params=PROVIDERS)
def provider(request) -> str:
    return request.param


@pytest.fixture
def seed() -> int:
    """A fresh seed per test run; put it in assertion messages so a failure can be replayed."""
    return random.randrange(2**31)
