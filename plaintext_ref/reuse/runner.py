"""Layer-by-layer runner for cache reuse: explicit positions, token subsets and block masks on a HF Llama.

The reuse methods (kv_methods.md §9, "common primitives") need three things HF's ``forward`` does not give:
(i) run a layer on a *subset* of token slots while the others' K/V come from a cache, (ii) explicit RoPE
positions per slot, so reused keys can be re-positioned, and (iii) an arbitrary (S, T) attention mask (Graph-KV's
block mask). :class:`LayerRunner` drives the HF modules of a Llama-family model (embed_tokens, the decoder layers'
norms / q,k,v,o projections / MLP, the final norm, lm_head, rotary_emb) one layer at a time; it reads the modules,
it never patches them. :class:`SeqKV` is the cache it works on: **pre-RoPE** keys, values and the position of each
slot, so re-positioning is rotating by the new position (exact), and ``rerotate`` gives the post-RoPE form
``k_new = R(p_new − p_old)·k_old`` for caches that hold rotated keys.

Mask convention: ``allowed`` (S, T) bool, True = query row may attend key slot. The default is slot-order causality
(``causal_rows``): query slot i sees slots ≤ i, which equals position causality when slots are laid out contiguously.

Shapes: S query tokens · T cache slots · H query heads · Hkv KV heads (G = H/Hkv) · D head dim · E model width ·
L layers · V vocabulary. Batch is 1 throughout (the methods are per request).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plaintext_ref.models import model_family


@dataclass
class SeqKV:
    """A request's (or a chunk's) cache: per layer pre-RoPE keys k[l] (1, Hkv, T, D), values v[l] (1, Hkv, T, D),
    and pos (T,) int64, the RoPE position each slot is (or was) encoded at."""

    k: list[Tensor]
    v: list[Tensor]
    pos: Tensor

    def __post_init__(self) -> None:
        assert len(self.k) == len(self.v), (len(self.k), len(self.v))
        for kl, vl in zip(self.k, self.v):
            assert kl.shape == vl.shape and kl.shape[2] == self.pos.shape[0], (kl.shape, vl.shape, self.pos.shape)

    @property
    def n(self) -> int:
        return int(self.pos.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def take(self, idx: Tensor) -> SeqKV:
        """Slots idx (K,) int64, in that order."""
        return SeqKV([t[:, :, idx] for t in self.k], [t[:, :, idx] for t in self.v], self.pos[idx])

    def at(self, pos: Tensor) -> SeqKV:
        """The same slots declared at new positions (T,) (keys are pre-RoPE: nothing else changes)."""
        assert pos.shape == self.pos.shape, (pos.shape, self.pos.shape)
        return SeqKV(self.k, self.v, pos.to(self.pos))

    def clone(self) -> SeqKV:
        return SeqKV([t.clone() for t in self.k], [t.clone() for t in self.v], self.pos.clone())

    @staticmethod
    def cat(parts: list[SeqKV]) -> SeqKV:
        layers = range(len(parts[0].k))
        return SeqKV([torch.cat([p.k[l] for p in parts], 2) for l in layers],
                     [torch.cat([p.v[l] for p in parts], 2) for l in layers],
                     torch.cat([p.pos for p in parts]))


def causal_rows(rows: Tensor, t: int) -> Tensor:
    """(S, T) bool: query slot rows[i] sees key slots 0..rows[i] (slot-order causality)."""
    return torch.arange(t, device=rows.device)[None, :] <= rows[:, None]


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LayerRunner:
    """Layer-wise forward of a HF Llama-family causal LM (Llama, Qwen2, Mistral) with explicit slots.

    GPT-2 is refused: its learned absolute positions cannot be re-positioned, which every reuse method needs.
    """

    def __init__(self, model: nn.Module) -> None:
        if model_family(model.config) != "llama":
            raise ValueError(f"cache reuse needs RoPE; {model.config.model_type!r} has learned positions")
        self.model = model
        self.decoder = model.get_decoder()
        self.layers = list(self.decoder.layers)
        self.num_layers = len(self.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.n_heads = model.config.num_attention_heads
        self.n_kv = model.config.num_key_value_heads
        self.device = next(model.parameters()).device

    # ---------------------------------------------------------------- pieces of one layer

    def rope(self, x: Tensor, pos: Tensor) -> Tensor:
        """Rotate x (1, h, n, D) to positions pos (n,) with the model's rotary table."""
        cos, sin = self.decoder.rotary_emb(x, pos[None].to(x.device))          # (1, n, D) each
        return x * cos[:, None] + rotate_half(x) * sin[:, None]

    def rerotate(self, k_rot: Tensor, old: Tensor, new: Tensor) -> Tensor:
        """Post-RoPE keys (1, h, n, D) encoded at ``old`` (n,) -> encoded at ``new``: R(new − old)·k."""
        return self.rope(self.rope(k_rot, -old), new) if not torch.equal(old, new) else k_rot

    def embed(self, ids: Tensor) -> Tensor:
        """ids (S,) -> hidden (1, S, E)."""
        return self.decoder.embed_tokens(ids[None].to(self.device))

    def qkv(self, l: int, h: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Layer l's post-RoPE q (1, H, S, D), pre-RoPE k (1, Hkv, S, D) and v (1, Hkv, S, D) of hidden (1, S, E)."""
        attn = self.layers[l].self_attn
        x = self.layers[l].input_layernorm(h)
        s = x.shape[1]
        q = attn.q_proj(x).view(1, s, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, s, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, s, -1, self.head_dim).transpose(1, 2)
        return self.rope(q, pos), k, v

    def attend(self, q: Tensor, k_rot: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
        """softmax(q kᵀ·scaling, masked by allowed (S, T)) v: (1, H, S, D) x (1, Hkv, T, D) -> (1, H, S, D)."""
        g = self.n_heads // self.n_kv
        return F.scaled_dot_product_attention(q, k_rot.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                              attn_mask=allowed.to(q.device), scale=self.scaling)

    def attention_probs(self, q: Tensor, k_rot: Tensor, allowed: Tensor) -> Tensor:
        """fp32 attention weights (1, H, S, T) (the same math as :meth:`attend`, for methods that need them)."""
        g = self.n_heads // self.n_kv
        logits = (q.float() @ k_rot.float().repeat_interleave(g, 1).transpose(-1, -2)) * self.scaling
        return logits.masked_fill(~allowed.to(q.device), float("-inf")).softmax(-1)

    def finish(self, l: int, h: Tensor, attn_out: Tensor) -> Tensor:
        """o_proj + residual + MLP block of layer l: hidden (1, S, E), attention output (1, H, S, D) -> (1, S, E)."""
        layer = self.layers[l]
        s = h.shape[1]
        h = h + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(1, s, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, h: Tensor) -> Tensor:
        """Final norm + LM head: (1, S, E) -> fp32 (1, S, V)."""
        return self.model.lm_head(self.decoder.norm(h)).float()

    # ---------------------------------------------------------------- whole forwards

    @torch.no_grad()
    def prefill(self, ids: Tensor, pos: Tensor | None = None, allowed: Tensor | None = None,
                logits_rows: Tensor | None = None) -> tuple[Tensor, SeqKV]:
        """Fresh forward of ids (T,) at positions pos (T,) (default 0..T−1) under allowed (T, T) (default causal).

        Returns logits (1, R, V) of the rows ``logits_rows`` (default: the last one) and the SeqKV of all T slots.
        """
        t = ids.shape[0]
        pos = torch.arange(t, device=self.device) if pos is None else pos.to(self.device)
        rows = torch.arange(t, device=self.device)
        allowed = causal_rows(rows, t) if allowed is None else allowed
        h = self.embed(ids)
        ks, vs = [], []
        for l in range(self.num_layers):
            q, k, v = self.qkv(l, h, pos)
            h = self.finish(l, h, self.attend(q, self.rope(k, pos), v, allowed))
            ks.append(k)
            vs.append(v)
        rows_out = rows[-1:] if logits_rows is None else logits_rows
        return self.logits(h[:, rows_out]), SeqKV(ks, vs, pos)

    @torch.no_grad()
    def extend(self, cache: SeqKV, ids: Tensor, pos: Tensor | None = None, allowed: Tensor | None = None
               ) -> tuple[Tensor, SeqKV]:
        """Append S tokens ids (S,) at pos (S,) (default right after the cache's last position) to ``cache``.

        allowed (S, T + S): default every cache slot plus slot-order causality among the new tokens.
        Returns logits (1, S, V) and the extended cache (a new SeqKV; ``cache`` is not modified).
        """
        s, t0 = ids.shape[0], cache.n
        if pos is None:
            start = int(cache.pos.max()) + 1 if t0 else 0
            pos = torch.arange(start, start + s, device=self.device)
        pos = pos.to(self.device)
        allowed = causal_rows(torch.arange(t0, t0 + s, device=self.device), t0 + s) if allowed is None else allowed
        all_pos = torch.cat([cache.pos.to(self.device), pos])
        h = self.embed(ids)
        ks, vs = [], []
        for l in range(self.num_layers):
            q, k, v = self.qkv(l, h, pos)
            k_all, v_all = torch.cat([cache.k[l], k], 2), torch.cat([cache.v[l], v], 2)
            h = self.finish(l, h, self.attend(q, self.rope(k_all, all_pos), v_all, allowed))
            ks.append(k_all)
            vs.append(v_all)
        return self.logits(h), SeqKV(ks, vs, all_pos)

    @torch.no_grad()
    def refresh_slots(self, cache: SeqKV, ids: Tensor, idx: Tensor) -> SeqKV:
        """Recompute the K/V of slots idx (K,) ascending, whose tokens are ids[idx], through every layer.

        Each layer: fresh k, v of the K tokens (from their fresh hidden states) overwrite the cached rows, then the
        K queries attend the whole (partly stale) cache with slot-order causality. Returns a new SeqKV.
        """
        out = cache.clone()
        pos = out.pos.to(self.device)
        h = self.embed(ids[idx])
        allowed = causal_rows(idx.to(self.device), out.n)
        for l in range(self.num_layers):
            q, k, v = self.qkv(l, h, pos[idx])
            out.k[l][:, :, idx] = k
            out.v[l][:, :, idx] = v
            h = self.finish(l, h, self.attend(q, self.rope(out.k[l], pos), out.v[l], allowed))
        return out


def teacher_forced(runner: LayerRunner, cache: SeqKV, last_logits: Tensor, answer: Tensor) -> Tensor:
    """Distributions over answer (A,) given a prefilled cache: (A, V) fp32 log-probs.

    Row 0 is the prefill's last-token distribution ``last_logits`` (1, 1, V); rows 1.. come from one extend of
    answer[:-1] (teacher forcing).
    """
    rows = [last_logits[0]]
    if answer.shape[0] > 1:
        logits, _ = runner.extend(cache, answer[:-1])
        rows.append(logits[0])
    return torch.cat(rows).log_softmax(-1)


@torch.no_grad()
def greedy(runner: LayerRunner, cache: SeqKV, last_logits: Tensor, max_new_tokens: int,
           eos: int | None = None) -> list[int]:
    """Greedy decode from a prefilled cache and its last-token logits (1, 1, V); returns the new token ids."""
    out: list[int] = []
    logits = last_logits
    for _ in range(max_new_tokens):
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        if tok == eos or len(out) == max_new_tokens:
            break
        logits, cache = runner.extend(cache, torch.tensor([tok], device=runner.device))
    return out
