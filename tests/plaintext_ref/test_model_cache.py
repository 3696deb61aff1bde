"""The embedded model's one-time cache: safe with concurrent loaders, never read half-written."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plaintext_ref import models

# Prints a sha256 over the loaded weights (fixed order), to compare what each process got.
LOADER = """
import hashlib
from plaintext_ref.models import load_model
h = hashlib.sha256()
for name, t in sorted(load_model("smollm2").model.state_dict().items()):
    h.update(name.encode())
    h.update(t.contiguous().numpy().tobytes())
print(h.hexdigest())
"""
TIMEOUT_S = 300  # for all 4: one conversion (~30 s alone on 2 cores), then 4 loads


def _build(out: Path) -> None:
    (out / "config.json").write_text("{}")


def _hidden(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith(".") and p.is_dir())


def test_broken_leftover_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")  # what the old race left: tokenizer files only
    assert models._publish_once(target, _build)
    assert sorted(p.name for p in target.iterdir()) == [models._COMPLETE, "config.json"]
    assert _hidden(tmp_path) == []
    assert not models._publish_once(target, pytest.fail)  # complete: never rebuilt


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def failing(out: Path) -> None:
        _build(out)
        raise RuntimeError("conversion failed")

    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        models._publish_once(target, failing)
    assert not target.exists() and _hidden(tmp_path) == []
    (tmp_path / f".{target.name}.tmp-killed").mkdir()  # a builder killed mid-way
    assert models._publish_once(target, _build)
    assert _hidden(tmp_path) == []


@pytest.mark.slow
def test_concurrent_first_loads(tmp_path: Path) -> None:
    env = dict(os.environ, MPCACHE_CACHE=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", LOADER], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        outs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    digests = {out.split()[-1] for out, _ in outs}
    assert len(digests) == 1, digests
    assert models._is_complete(tmp_path / models.SMOLLM2_FP32)
    assert _hidden(tmp_path) == []
