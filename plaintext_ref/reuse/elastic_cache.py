"""Elastic-Cache: adaptive KV refresh for diffusion LMs ("Attention Is All You Need for KV Cache in Diffusion LLMs",
Nguyen-Tri, Ranjan, Shen, arXiv 2510.14973); read from the paper, no code read.

A masked-diffusion LM recomputes Q/K/V of every position at every denoising step. Elastic-Cache keeps per-layer K/V
(and layer inputs) of all positions and, each step, runs only the **active window** (the current block's positions)
through the layers over the cached K/V of everything else (distant MASK and prompt tokens act as a cached length
bias). It decides:
* **when** to refresh — at layer ℓ, the attention column of the token that was most attended at ℓ in the previous
  step, a_ℓ^t = A_ℓ^t[:, :, :, j*_ℓ] (over heads × active queries), is compared with the previous step's,
  σ_ℓ = cos(a_ℓ^t, a_ℓ^{t−1}); the most-attended token drifts least, so a drop of σ_ℓ is a conservative signal that
  the cache went stale. Refresh when ``1 − σ_ℓ ≥ drift_threshold`` (the paper's σ < γ with γ = 1 − threshold).
* **where** — depth-aware: the first layer ℓ that fails the test and every deeper layer are recomputed for all
  positions (their inputs at ℓ come from the cached layer-ℓ inputs, with the active rows fresh); the shallower
  layers' caches are reused. Drift grows with depth, so refreshes usually start deep.
A new block (the window moves) always refreshes from layer 0.

Defaults: drift_threshold 0.1 (γ = 0.9) [ours; the paper's γ is marked verify in kv_methods.md §11], block 16,
one token per step (LLaDA's semi-autoregressive sampler, :func:`plaintext_ref.reuse.diffusion_lm.generate`).

Deviations:
1. The active window is exactly the current block (the paper slides a window over the masked tokens).
2. The attention column is taken over heads × window queries at that layer; j* is re-chosen every step (argmax of
   the attention summed over heads and queries).
3. Cost is counted in token-layers (positions × layers whose Q/K/V/MLP were computed), not wall time on a GPU.

Check: drift_threshold 0 refreshes every step from layer 0 and then equals the baseline bit for bit (same code path).
Needs: bidirectional attention weights of the window queries at every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from plaintext_ref.reuse.diffusion_lm import MASK_ID, DiffusionLM, unmask


@dataclass
class ElasticCache:
    """Parameters
    ----------
    drift_threshold : float in [0, 2], default 0.1; 0 = refresh every step (the baseline).
    block_len : int, default 16.
    tokens_per_step : int, default 1.
    """

    drift_threshold: float = 0.1
    block_len: int = 16
    tokens_per_step: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.drift_threshold <= 2.0:
            raise ValueError(f"ElasticCache.drift_threshold must lie in [0, 2], got {self.drift_threshold}")
        if self.block_len < 1 or self.tokens_per_step < 1:
            raise ValueError(f"ElasticCache: block_len and tokens_per_step must be >= 1, got "
                             f"{self.block_len}, {self.tokens_per_step}")

    @torch.no_grad()
    def generate(self, model: DiffusionLM, prompt: Tensor, gen_len: int) -> tuple[Tensor, dict]:
        """prompt (P,) -> sequence (P + gen_len,) and counters: steps, refreshes, refresh layers, token_layers."""
        x = torch.cat([prompt, torch.full((gen_len,), MASK_ID, dtype=torch.long)])[None]
        t, n_layers = x.shape[1], model.cfg.n_layers
        pos = torch.arange(t)
        cache: list[list[Tensor]] = [[None, None, None] for _ in range(n_layers)]   # per layer [h_in, k, v]
        prev_col: list[Tensor | None] = [None] * n_layers
        star: list[int] = [0] * n_layers
        stats = dict(steps=0, refreshes=0, refresh_layers=[], token_layers=0)
        for lo in range(prompt.numel(), t, self.block_len):
            hi = min(lo + self.block_len, t)
            first = True
            while bool((x[0, lo:hi] == MASK_ID).any()):
                logits = self._step(model, x, pos, lo, hi, cache, prev_col, star, stats, force=first)
                x = unmask(x, logits, lo, hi, self.tokens_per_step)
                stats["steps"] += 1
                first = False
        stats["baseline_token_layers"] = stats["steps"] * t * n_layers
        stats["compute_fraction"] = stats["token_layers"] / stats["baseline_token_layers"]
        stats["refresh_rate"] = stats["refreshes"] / stats["steps"]
        return x[0], stats

    def _step(self, model, x, pos, lo, hi, cache, prev_col, star, stats, force: bool) -> Tensor:
        """One denoising step; returns logits (1, T or hi − lo, V)."""
        n_layers = model.cfg.n_layers
        if force or cache[0][1] is None:
            return self._refresh(model, x, pos, 0, None, lo, hi, cache, prev_col, star, stats)
        h = model.embed(x[:, lo:hi], pos[lo:hi])                                  # (1, A, E)
        for l in range(n_layers):
            stats["token_layers"] += hi - lo
            q, k, v = model.qkv(l, h)
            keys, vals = cache[l][1].clone(), cache[l][2].clone()
            keys[:, :, lo:hi], vals[:, :, lo:hi] = k, v
            a, w = model.attend(q, keys, vals, probs=True)                        # w (1, H, A, T)
            col = w[0, :, :, star[l]].flatten()
            sim = float(F.cosine_similarity(col, prev_col[l], dim=0).clamp(-1, 1)) if prev_col[l] is not None else -1.0
            if self.drift_threshold == 0.0 or 1.0 - sim >= self.drift_threshold:
                stats["token_layers"] -= hi - lo                                  # this layer is redone in full
                return self._refresh(model, x, pos, l, h, lo, hi, cache, prev_col, star, stats)
            star[l] = int(w[0].sum(dim=(0, 1)).argmax())
            prev_col[l] = w[0, :, :, star[l]].flatten()
            cache[l][0][:, lo:hi], cache[l][1], cache[l][2] = h, keys, vals
            h = model.finish(l, h, a)
        return model.logits(h)

    def _refresh(self, model, x, pos, start, h_active, lo, hi, cache, prev_col, star, stats) -> Tensor:
        """Recompute layers start..L−1 for every position (layer-0 inputs are the current embeddings)."""
        if start == 0:
            h = model.embed(x, pos)
        else:
            h = cache[start][0].clone()
            h[:, lo:hi] = h_active
        h, states, weights = model.forward_from(h, start, probs=True)
        for l, (h_in, k, v), w in zip(range(start, model.cfg.n_layers), states, weights):
            cache[l] = [h_in, k, v]
            win = w[0, :, lo:hi]                                                    # (H, A, T)
            star[l] = int(win.sum(dim=(0, 1)).argmax())
            prev_col[l] = win[:, :, star[l]].flatten()
        stats["refreshes"] += 1
        stats["refresh_layers"].append(start)
        stats["token_layers"] += x.shape[1] * (model.cfg.n_layers - start)
        return model.logits(h)
