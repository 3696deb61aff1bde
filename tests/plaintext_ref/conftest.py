"""Session-scoped models for plaintext_ref tests (tiny ones are random and seeded; never downloaded)."""
from __future__ import annotations

import pytest

from plaintext_ref.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2() -> LoadedModel:
    return load_model("tiny-gpt2")


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model("smollm2")


@pytest.fixture(params=["tiny-llama", "tiny-gpt2"])
def tiny_model(request) -> LoadedModel:
    """Each tiny family in turn."""
    return request.getfixturevalue(request.param.replace("-", "_"))
