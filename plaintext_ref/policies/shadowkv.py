"""ShadowKV: low-rank pre-RoPE keys, offloaded values, landmark-based chunk selection (Sun et al., arXiv 2410.21465).

Rule (bytedance/ShadowKV ``models/kv_cache.py``, ``models/base.py``). After a prompt of n > min_prompt tokens:
the pre-RoPE keys of the prompt, concatenated over KV heads, are factored K_pre ≈ U_r (S_r V_rᵀ) (rank r,
U: (N, r), SV: (Hkv, r, D)); the prompt is cut into chunks of c tokens; the last ``local_chunks`` chunks and
the remainder stay exact; each other chunk gets a landmark (mean post-RoPE key), and the ``outlier_chunks``
chunks with the lowest min_j cos(landmark, k_j) stay exact too. Each decode step scores the remaining
landmarks with p = max_{g∈group} Σ_s softmax(q_{g,s}·landmarkᵀ/√D), takes the top budget/c chunks, rebuilds
their keys as RoPE(U[j]·SV, pos_j) and fetches their values, and attends [local, outliers, selected, generated].

Defaults: r = 160, c = 8, local_chunks = 4, outlier_chunks = 48 (GPU variant), sparse budget = 2048 tokens
(256 chunks), compression only for prompts longer than 4096 tokens (all from the authors' code/README).

Deviations:
1. The landmark softmax uses the model's 1/√D; the authors hard-code 1/√128 (their models have D = 128).
2. Values are offloaded to host memory (and fetched per selected chunk) only when they live on CUDA
   (``offload_values=None``); on CPU they stay in place: the host is the device.
3. The exact keys (and offloaded values) of landmark chunks are dropped from ``LayerKV`` (zeroed), not freed:
   tensors keep their shapes, so this shows the reconstruction is what attention reads, not a memory saving.
4. A float budget is the fraction of the current cache (``Budget.of``); the chunk count is budget // c.
5. Pre-RoPE keys come from un-rotating the cached keys, R(−p)·k (exact for RoPE without attention scaling).

GQA: landmark selection per KV head, max over its query group; one SVD per layer shared by the KV heads.
Needs: post-RoPE queries and the model's RoPE (``StepCtx.rope``; GPT-2 has none: keys are used as they are).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from plaintext_ref.policies.base import Budget, KVPolicy, LayerKV, StepCtx

AUX_KEY = "shadowkv"


@dataclass
class ShadowState:
    """One layer's ShadowKV state over the first N = C·c prompt slots (the chunked region).

    u: (B, N, r), sv: (B, Hkv, r, D) low-rank pre-RoPE keys; landmarks: (B, Hkv, Cl, D) and landmark_ids:
    (B, Hkv, Cl) chunk ids of the non-outlier chunks; outlier: (B, Hkv, C) bool; v_host: (B, Hkv, N, D) on
    the host or None; selected: (B, Hkv, K) chunk ids chosen this step (set by ``select`` for ``read``).
    """

    u: Tensor
    sv: Tensor
    landmarks: Tensor
    landmark_ids: Tensor
    outlier: Tensor
    v_host: Tensor | None
    selected: Tensor | None = None


def low_rank(k_pre: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """K_pre (B, Hkv, N, D) ≈ U·SV over the concatenated heads -> U (B, N, r), SV (B, Hkv, r, D)."""
    b, hkv, n, d = k_pre.shape
    flat = k_pre.float().transpose(1, 2).reshape(b, n, hkv * d)               # (B, N, Hkv·D)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    r = min(rank, s.shape[-1])
    sv = (s[..., :r, None] * vh[..., :r, :]).view(b, r, hkv, d).transpose(1, 2)   # (B, Hkv, r, D)
    return u[..., :r], sv


@dataclass
class ShadowKV(KVPolicy):
    """ShadowKV: low-rank keys + landmark chunk selection (see the module docstring).

    Parameters
    ----------
    budget : int tokens (default 2048), float fraction of the cache, or Budget: sparse (selected-chunk) tokens.
    rank : int, default 160, SVD rank r (clipped to min(N, Hkv·D)).
    chunk_size, local_chunks, outlier_chunks : int, defaults 8, 4, 48.
    min_prompt : int, default 4096; prompts of at most this many tokens are left dense.
    offload_values : bool or None (default: offload when values are on CUDA).
    """

    budget: Budget | int | float = 2048
    rank: int = 160
    chunk_size: int = 8
    local_chunks: int = 4
    outlier_chunks: int = 48
    min_prompt: int = 4096
    offload_values: bool | None = None
    needs = frozenset({"q"})

    def __post_init__(self) -> None:
        self.budget = Budget.of(self.budget)
        if self.rank < 1 or self.chunk_size < 1 or min(self.local_chunks, self.outlier_chunks, self.min_prompt) < 0:
            raise ValueError(f"ShadowKV needs rank, chunk_size >= 1 and local_chunks, outlier_chunks, min_prompt "
                             f">= 0; got {self.rank}, {self.chunk_size}, {self.local_chunks}, "
                             f"{self.outlier_chunks}, {self.min_prompt}")

    def on_prefill(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        """Factor the prompt keys, build landmarks and outliers, drop the exact landmark-chunk keys/values."""
        c = self.chunk_size
        n_chunks = kv.n // c - self.local_chunks
        if kv.n <= self.min_prompt or n_chunks <= 0:
            return kv
        b, hkv, _, d = kv.k.shape
        n = n_chunks * c
        k_post, pos = kv.k[:, :, :n], kv.pos[:, :, :n]                          # (B, Hkv, N, D), (B, Hkv, N)
        k_pre = k_post if ctx.rope is None else ctx.rope(k_post, -pos)
        u, sv = low_rank(k_pre, self.rank)
        chunks = k_post.float().view(b, hkv, n_chunks, c, d)
        landmarks = chunks.mean(dim=3)                                          # (B, Hkv, C, D)
        min_cos = F.cosine_similarity(chunks, landmarks[:, :, :, None], dim=-1).amin(dim=-1)   # (B, Hkv, C)
        n_out = min(self.outlier_chunks, n_chunks)
        out_idx = min_cos.topk(n_out, dim=-1, largest=False).indices
        outlier = torch.zeros_like(min_cos, dtype=torch.bool).scatter_(-1, out_idx, True)
        ids = outlier.to(torch.int8).argsort(dim=-1, stable=True)[..., :n_chunks - n_out]   # (B, Hkv, Cl)
        dropped = F.pad((~outlier).repeat_interleave(c, dim=-1), (0, kv.n - n), value=False)[..., None]
        offload = kv.v.is_cuda if self.offload_values is None else self.offload_values
        v_host = kv.v[:, :, :n].to("cpu", copy=True) if offload else None
        if v_host is not None and kv.v.is_cuda:
            v_host = v_host.pin_memory()
        kv.aux[AUX_KEY] = ShadowState(u, sv, landmarks.gather(2, ids[..., None].expand(-1, -1, -1, d)), ids,
                                      outlier, v_host)
        return replace(kv, k=kv.k.masked_fill(dropped, 0), v=kv.v.masked_fill(dropped, 0) if offload else kv.v)

    def select(self, ctx: StepCtx, kv: LayerKV) -> Tensor | None:
        """(B, Hkv, S, T) bool: everything but the unselected landmark chunks; None while uncompressed."""
        state = kv.aux.get(AUX_KEY)
        if state is None or ctx.phase == "prefill":
            return None
        b, hkv, t = kv.k.shape[:3]
        _, h, s, d = ctx.q.shape
        n_sel = min(self.budget.resolve(ctx.layer_idx, ctx.num_layers, t) // self.chunk_size,
                    state.landmark_ids.shape[-1])
        qg = ctx.q.float().view(b, hkv, h // hkv, s, d)                         # (B, Hkv, G, S, D)
        logits = qg @ state.landmarks[:, :, None].transpose(-1, -2) * ctx.scaling   # (B, Hkv, G, S, Cl)
        score = logits.softmax(dim=-1).sum(dim=3).amax(dim=2)                   # (B, Hkv, Cl)
        top = score.topk(n_sel, dim=-1).indices
        state.selected = state.landmark_ids.gather(-1, top).sort(dim=-1).values   # (B, Hkv, K) chunk ids
        keep = state.outlier.clone().scatter_(-1, state.selected, True).repeat_interleave(self.chunk_size, dim=-1)
        mask = torch.cat([keep, keep.new_ones(b, hkv, t - keep.shape[-1])], dim=-1) & kv.valid_mask()
        return mask[:, :, None, :].expand(b, hkv, s, t)

    def read(self, ctx: StepCtx, kv: LayerKV) -> tuple[Tensor, Tensor, Tensor | None]:
        """Exact K/V, with the selected chunks' keys rebuilt as RoPE(U·SV) and their values fetched from the host."""
        state = kv.aux.get(AUX_KEY)
        if state is None or state.selected is None or ctx.phase == "prefill":
            return kv.k, kv.v, kv.bias
        b, hkv, _, d = kv.k.shape
        r = state.u.shape[-1]
        tok = (state.selected[..., None] * self.chunk_size
               + torch.arange(self.chunk_size, device=kv.k.device)).flatten(-2)   # (B, Hkv, K·c)
        u = state.u[:, None].expand(b, hkv, -1, r).gather(2, tok[..., None].expand(-1, -1, -1, r))
        k_sel = u @ state.sv                                                    # (B, Hkv, K·c, D) pre-RoPE
        if ctx.rope is not None:
            k_sel = ctx.rope(k_sel, kv.pos.gather(2, tok))
        index = tok[..., None].expand(-1, -1, -1, d)
        k = kv.k.scatter(2, index, k_sel.to(kv.k.dtype))
        if state.v_host is None:
            return k, kv.v, kv.bias
        v_sel = state.v_host.gather(2, index.cpu()).to(kv.v.device, non_blocking=True)
        return k, kv.v.scatter(2, index, v_sel), kv.bias
