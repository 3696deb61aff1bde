"""The model names ``load_model`` knows, and light checks of a model spec (no torch, no transformers).

A spec is ``"smollm2"`` (the embedded default), one of ``TINY_CONFIGS`` (random test models with
SmolLM2's tokenizer), or a local HuggingFace model directory. The CLI checks specs with these before
any heavy import, so a wrong path is a one-line usage error.
"""
from __future__ import annotations

from pathlib import Path

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
NAMED = (DEFAULT_MODEL, *TINY_CONFIGS)  # specs that are names, not directories
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_model_spec(spec: str, flag: str = "--model") -> None:
    """Raise ``ValueError`` unless ``spec`` is a known name or a directory with a ``config.json``."""
    if spec in NAMED:
        return
    if not (Path(spec).expanduser() / "config.json").is_file():
        raise ValueError(f"{flag} {spec!r}: not {DEFAULT_MODEL!r}, one of {sorted(TINY_CONFIGS)}, "
                         "or a HuggingFace model directory with a config.json")


def check_tokenizer_spec(spec: str, flag: str = "--tokenizer") -> None:
    """Raise ``ValueError`` unless ``spec`` is a known name or a directory with tokenizer files."""
    if spec in NAMED:
        return
    folder = Path(spec).expanduser()
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"{flag} {spec!r}: not {DEFAULT_MODEL!r}, one of {sorted(TINY_CONFIGS)}, or a "
                         f"directory with tokenizer files ({', '.join(_TOKENIZER_FILES)})")
