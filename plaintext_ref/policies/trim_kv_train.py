"""Training of TRIM-KV's retention gates (:mod:`plaintext_ref.policies.trim_kv`) on a frozen SmolLM2, on a CPU.

Objective (Bui et al., arXiv 2512.03324, §3; kv_methods.md §8.1). Every layer of the frozen model runs
retention-gated attention, the paper's form, per KV head h with its G query heads:
    o_t = Σ_{i≤t} softmax_i(ᾱ_{t,i}·scaling·q_t·k_i)·v_i,     ᾱ_{t,i} = β_i^{t−i},  β_i = σ(W_l[h]·x_i + b_l[h]),
and only the gates are trained, on one window of S tokens per step:
    L = KL(p_full ‖ p_gated) + λ_ntp·CE(p_gated, next token) + λ_cap·L_cap,
    L_cap = mean_{l,h,t} max(0, Σ_{i≤t} ᾱ_{t,i} − M) / M,
KL and CE averaged over the window's positions; p_full is the same model with dense attention (sdpa), without
gradients. L_cap pushes the soft cache size Σ_i ᾱ_{t,i} of every layer and head below the memory M, so that
evicting all but M tokens at inference removes little of the gated attention's mass.

Data: the Python 3.11 documentation (Debian python3.11-doc, ``plaintext_ref.eval.corpus``, corpus
"python-doc"), *after* the first ``corpus.MAX_CHARS`` characters that ``plaintext_ref.eval`` and
``benchmarks.kv_quality`` draw their windows from, so training and evaluation text are disjoint; cut into
consecutive windows of S tokens, taken in a seeded random order.

Deviations from the paper's training:
1. Minutes on a CPU: the shipped gates saw 229 steps of one 512-token window (117K tokens), M = 128, against the
   paper's fine-tuning on long reasoning traces on GPUs; the gates are linear (trim_kv deviation 1).
2. The capacity loss is a hinge on the soft cache size relative to M, averaged over layers, heads and positions
   (the paper penalises the same soft size above M; its normalisation is not reproduced exactly).
3. Adam at a constant learning rate, one lr for W and a larger one for b (the bias must travel from 10 to
   ≈ 5 for any decay at M = 128 within the step budget); no warm-up, no schedule.

Shipped gates (plaintext_ref/data/trimkv_smollm2.pt):
    python -m plaintext_ref.policies.trim_kv_train --minutes 18 --seq-len 512 --memory 128
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface

from plaintext_ref.eval.corpus import MAX_CHARS, load_named
from plaintext_ref.models import load_model
from plaintext_ref.policies.trim_kv import GATES_FILE, RetentionGates, attention_modules

log = logging.getLogger(__name__)
GATED_ATTN = "trimkv_gated"
GateForm = Literal["scale", "bias"]   # ᾱ·(q·k) (the paper) or q·k + log ᾱ


@dataclass
class TrainConfig:
    """Gate training run; every field is a CLI flag (``--seq-len`` for seq_len, ...)."""

    model: str = "smollm2"
    seq_len: int = 512          # S, tokens per window (one window per step)
    memory: int = 128           # M of the capacity loss
    minutes: float = 18.0       # wall-clock budget; training stops at the first step past it
    max_steps: int = 100_000
    lr: float = 1e-2            # Adam, gate weights W
    bias_lr: float = 1e-1       # Adam, gate biases b
    ntp_weight: float = 1.0     # λ_ntp
    cap_weight: float = 1.0     # λ_cap
    bias_init: float = 10.0
    form: GateForm = "scale"    # gated attention: "scale" ᾱ·(q·k) (the paper) or "bias" q·k + log ᾱ
    train_chars: int = 1_500_000  # characters of held-out prose tokenized for training
    seed: int = 0
    threads: int = 1
    out: str = str(GATES_FILE)

    def __post_init__(self) -> None:
        if not 1 <= self.memory < self.seq_len:
            raise ValueError(f"memory must lie in [1, seq_len), got {self.memory} with seq_len {self.seq_len}")
        if self.minutes <= 0 or self.max_steps < 1 or min(self.lr, self.bias_lr) <= 0:
            raise ValueError(f"minutes, max_steps, lr and bias_lr must be positive, got {self.minutes}, "
                             f"{self.max_steps}, {self.lr}, {self.bias_lr}")
        if self.form not in ("scale", "bias"):
            raise ValueError(f"form must be scale or bias, got {self.form!r}")


@dataclass
class GateRun:
    """What one gated forward shares between the hooks and the attention: per layer log β (B, Hkv, S) and the
    soft cache size Σ_{i≤t} ᾱ_{t,i} (B, Hkv, S)."""

    gates: RetentionGates
    form: GateForm = "scale"
    log_beta: dict[int, Tensor] = field(default_factory=dict)
    soft_size: dict[int, Tensor] = field(default_factory=dict)


def gated_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                    scaling: float | None = None, dropout: float = 0.0, trimkv: GateRun | None = None,
                    **kwargs) -> tuple[Tensor, None]:
    """Retention-gated causal attention (registered as "trimkv_gated"): query (B, H, S, D), key/value
    (B, Hkv, S, D) -> (B, S, H, D). Unpadded windows only (``attention_mask`` is not used)."""
    assert trimkv is not None, "gated attention needs trimkv=GateRun(...) in the forward's keywords"
    b, h, s, d = query.shape
    hkv = key.shape[1]
    scaling = d ** -0.5 if scaling is None else scaling
    log_beta = trimkv.log_beta[module.layer_idx]                                       # (B, Hkv, S)
    age = torch.arange(s, device=query.device)[:, None] - torch.arange(s, device=query.device)[None, :]  # t − i
    causal = age >= 0                                                                  # (S, S)
    log_alpha = age.clamp(min=0) * log_beta[:, :, None, :]                            # (B, Hkv, S, S)
    alpha = log_alpha.exp() * causal
    trimkv.soft_size[module.layer_idx] = alpha.sum(dim=-1)
    qg = query.float().view(b, hkv, h // hkv, s, d)                                    # (B, Hkv, G, S, D)
    logits = (qg @ key.float()[:, :, None].transpose(-1, -2)) * scaling                 # (B, Hkv, G, S, S)
    logits = logits * alpha[:, :, None] if trimkv.form == "scale" else logits + log_alpha[:, :, None]
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    out = probs @ value.float()[:, :, None]                                            # (B, Hkv, G, S, D)
    return out.reshape(b, h, s, d).transpose(1, 2).to(query.dtype), None


def _gate_run_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Pre-hook of ``self_attn`` during training: log β of the layer's input, with gradients."""
    run = kwargs.get("trimkv")
    if run is not None:
        run.log_beta[module.layer_idx] = run.gates(module.layer_idx, kwargs["hidden_states"])


def training_windows(tokenizer, cfg: TrainConfig) -> Tensor:
    """(N, S) token windows of the held-out prose (see the module docstring), in a seeded random order."""
    text = load_named("python-doc", max_chars=MAX_CHARS + cfg.train_chars).text[MAX_CHARS:]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = len(ids) // cfg.seq_len
    assert n > 0, f"{len(ids)} held-out tokens do not fill one window of {cfg.seq_len}"
    windows = ids[:n * cfg.seq_len].view(n, cfg.seq_len)
    return windows[torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))]


def losses(model: nn.Module, gates: RetentionGates, ids: Tensor, memory: int, form: GateForm) -> dict[str, Tensor]:
    """kl, ntp, cap (each a scalar) of one batch of windows ids (B, S)."""
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        teacher = model(ids).logits.float().log_softmax(dim=-1)                        # (B, S, V)
    model.set_attn_implementation(GATED_ATTN)
    run = GateRun(gates, form)
    student = model(ids, trimkv=run, use_cache=False).logits.float().log_softmax(dim=-1)
    kl = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
    ntp = F.nll_loss(student[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    size = torch.stack([run.soft_size[i] for i in sorted(run.soft_size)])             # (L, B, Hkv, S)
    cap = (size - memory).clamp(min=0).mean() / memory
    return {"kl": kl, "ntp": ntp, "cap": cap}


def train(cfg: TrainConfig) -> tuple[RetentionGates, dict]:
    """Train gates under ``cfg``; returns them and the training record (the saved ``meta``)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tokenizer, config = load_model(cfg.model)
    model.requires_grad_(False)
    gates = RetentionGates.for_config(config, cfg.bias_init)
    windows = training_windows(tokenizer, cfg)
    AttentionInterface.register(GATED_ATTN, gated_attention)
    hooks = [m.register_forward_pre_hook(_gate_run_hook, with_kwargs=True) for m in attention_modules(model)]
    opt = torch.optim.Adam([{"params": [gates.weight], "lr": cfg.lr}, {"params": [gates.bias], "lr": cfg.bias_lr}])
    history: list[dict[str, float]] = []
    start = time.monotonic()
    try:
        for step in range(min(cfg.max_steps, len(windows))):
            parts = losses(model, gates, windows[step:step + 1], cfg.memory, cfg.form)
            loss = parts["kl"] + cfg.ntp_weight * parts["ntp"] + cfg.cap_weight * parts["cap"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append({"loss": loss.item(), **{k: v.item() for k, v in parts.items()}})
            if step % 10 == 0:
                log.info("step %d  %s  %.0fs", step, "  ".join(f"{k} {v:.4f}" for k, v in history[-1].items()),
                         time.monotonic() - start)
            if time.monotonic() - start > 60 * cfg.minutes:
                break
    finally:
        for hook in hooks:
            hook.remove()
        model.set_attn_implementation("sdpa")
    return gates, record(cfg, history, time.monotonic() - start, gates)


def record(cfg: TrainConfig, history: list[dict[str, float]], seconds: float, gates: RetentionGates) -> dict:
    """The training record: config, data, machine, time and the mean losses of the first and last 10 steps."""
    mean = lambda rows: {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    beta = torch.sigmoid(gates.bias.detach())
    return {"config": asdict(cfg), "steps": len(history), "tokens": len(history) * cfg.seq_len,
            "seconds": round(seconds, 1), "first10": mean(history[:10]), "last10": mean(history[-10:]),
            "bias_beta_range": [float(beta.min()), float(beta.max())],
            "data": f"python-doc (Debian python3.11-doc) characters {MAX_CHARS}..{MAX_CHARS + cfg.train_chars}",
            "machine": f"{cfg.threads} torch thread(s) on a {os.cpu_count()}-core CPU ({_cpu_name()}), "
                       f"torch {torch.__version__}",
            "command": "python -m plaintext_ref.policies.trim_kv_train " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if v != getattr(TrainConfig, k))}


def _cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in asdict(TrainConfig()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    gates, meta = train(cfg)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    gates.save(cfg.out, meta)
    print(f"wrote {cfg.out}: {meta['steps']} steps, {meta['tokens']} tokens, {meta['seconds']} s, "
          f"last-10 losses {meta['last10']}")


if __name__ == "__main__":
    main()
