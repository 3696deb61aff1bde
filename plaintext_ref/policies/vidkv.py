"""VidKV: 1.x-bit KV cache quantization for video LLMs (Tao et al., arXiv 2503.16257).

Based on https://arxiv.org/abs/2503.16257 and kv_methods.md §6.3.

Rule (KD-TAO/VidKV ``QuantizedCacheVLM`` / ``QuantizedCacheVLMSTP`` in its ``transformers/cache_utils.py``),
for each block of cached tokens, per layer:
* keys, mixed precision by channel: rank the D channels by their range max − min over all heads and tokens
  of the block; the widest ⌊(key_bits − 1)·D⌋ ("anomalous") channels get ``difficult_bits``-bit min-max RTN,
  the others 1 bit after an FFT along the channel axis: the spectrum of the easy sub-vector, each real
  coefficient sign-quantized with scale s = mean|c| over a group, x̂ = ifft(ŝ·sign).real. Groups are G
  tokens of one channel (one coefficient) everywhere (``axis=-1`` in the original);
* values, per channel (the paper's finding for video LLMs): ternary ("1.58-bit") codes q ∈ {−1, 0, +1} with
  s = mean|x| over G tokens of one channel, q = sign(x) where |x| > s/2, else 0; x̂ = s·q. An integer
  ``value_bits`` uses min-max RTN per channel instead;
* STP (semantic token protection): a share ``stp_ratio`` of the prompt's salient tokens keep their values at
  ``stp_bits``-bit min-max instead of ternary;
* blocks: the prompt's first n − n mod G tokens after the prompt, then a full-precision residual that is
  quantized as one block whenever it holds R tokens.

Defaults: key_bits 1.5 (half the channels at 2 bits), value_bits 1.58, G = 32, R = 128 (README configs
``nbits [1.5, 1.58], q_group_size 32, residual_length 128``), STP off (video default ``vidkv_stp=0.2``).

What carries over to text: the key and value quantizers are modality-free and run unchanged. STP does not:
the original ranks *visual* tokens by the mean similarity of their input embeddings to the text tokens'
(LLaVA-OneVision only). The text analogue here ranks prompt tokens by the attention of the last
``stp_window`` prompt queries (mean over query heads), computed per layer. Per-channel values were found
for video LLMs; text LLMs are usually quantized per token (KIVI), so ``value_bits`` may matter more here.

Deviations:
1. Blocks are quantized once (KIVI-style flush); the original re-quantizes the whole dequantized cache at
   every flush, compounding error, and re-splits the channels then. The split here is per block.
2. The channel split is per sequence (batch row); the original takes the range over the batch too.
3. The FFT uses the D_e independent real coefficients of the real input's spectrum (``torch.fft.rfft``:
   real parts of bins 0..⌊D_e/2⌋, imaginary parts of bins 1..⌈D_e/2⌉ − 1). The original quantizes all
   2·D_e real and imaginary parts of ``torch.fft.fft``; with sign codes and mean-|·| scales over tokens the
   conjugate bins quantize identically, so x̂ is the same and 1 bit per easy element is honest.
4. Dequantization multiplies by the scales: the released ``unpack_and_dequant_vcache`` returns the ternary
   codes unscaled, and its 1-bit path maps codes {0, 1} to {0, s} instead of {−s, +s}.
5. STP tokens: ⌊N·stp_ratio/G⌋·G salient tokens of the prompt block (the original also drops the last 32
   of its top-k list, a quirk not kept), chosen per layer as above; decode blocks have none.
6. Dequantized slots replace the exact ones in ``LayerKV.k``/``v`` (a simulated cache); the codes live in
   ``LayerKV.aux`` per block.

Memory of one block of N tokens, B = 1, D_h = ⌊(key_bits − 1)·D⌋ hard channels, D_e = D − D_h, S salient
tokens (``memory``; g = N/G groups per channel):
keys   Hkv·[b_d·N·D_h + 2·16·g·D_h + 1·N·D_e + 16·g·D_e] + D (channel mask, when 0 < D_h < D);
values Hkv·[1.6·(N − S)·D + 16·(N − S)/G·D + b_s·S·D + 2·16·S/G·D] + N (token mask, when S > 0);
plus 16·2·Hkv·D per full-precision residual token. Ternary codes are counted at 8/5 bits (5 trits per
byte; log2 3 ≈ 1.585 is the paper's nominal, the released code stores 2 bits).

GQA: per KV head; the channel split and the STP tokens are shared by the heads of a layer.
Needs: K and V; STP also the last prompt queries (``StepCtx.q``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from plaintext_ref.policies.base import KVPolicy, LayerKV, StepCtx, window_attention
from plaintext_ref.policies.quant import FP_BITS, KVMemory, dequantize_groups, quantize_groups

TERNARY_BITS = 8 / 5       # 5 ternary codes per byte
BLOCKS = "vidkv_blocks"    # LayerKV.aux: list[Block], oldest first; they cover slots 0 .. N_Q − 1
N_Q = "vidkv_n"            # LayerKV.aux: int, number of quantized slots


def spectrum(x: Tensor) -> Tensor:
    """The n independent real coefficients of the DFT of real x (..., n) along the last axis -> (..., n)."""
    n = x.shape[-1]
    f = torch.fft.rfft(x.float(), dim=-1)                                   # (..., n // 2 + 1)
    return torch.cat([f.real, f.imag[..., 1:(n + 1) // 2]], dim=-1)


def from_spectrum(c: Tensor, n: int) -> Tensor:
    """Inverse of :func:`spectrum`: (..., n) coefficients -> real signal (..., n)."""
    re, im = c[..., : n // 2 + 1], c[..., n // 2 + 1:]
    im = torch.nn.functional.pad(im, (1, n // 2 + 1 - 1 - im.shape[-1]))   # DC (and Nyquist) imag = 0
    return torch.fft.irfft(torch.complex(re, im), n=n, dim=-1)


def _by_group(x: Tensor, group: int) -> Tensor:
    """(B, Hkv, N, C) -> (B, Hkv, C, N/group, group): groups of tokens of one channel."""
    return x.float().movedim(2, -1).unflatten(-1, (-1, group))


def _from_groups(x: Tensor) -> Tensor:
    """Inverse of :func:`_by_group`."""
    return x.flatten(-2).movedim(-1, 2)


def sign_quantize(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """1-bit codes (x >= 0) and scale mean|x| per group of tokens: (B, Hkv, N, C) uint8, (B, Hkv, N/G, C)."""
    g = _by_group(x, group)
    return _from_groups(g >= 0).to(torch.uint8), g.abs().mean(dim=-1).movedim(-1, 2)


def sign_dequantize(codes: Tensor, scale: Tensor, group: int) -> Tensor:
    q = _by_group(codes, group) * 2 - 1
    return _from_groups(q * scale.movedim(2, -1)[..., None])


def ternary_quantize(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Codes q + 1 ∈ {0, 1, 2}, q = sign(x)·[|x| > s/2], and s = mean|x| per group of tokens of one channel."""
    g = _by_group(x, group)
    s = g.abs().mean(dim=-1, keepdim=True)
    q = torch.where(g > s / 2, 1, torch.where(g < -s / 2, -1, 0))
    return _from_groups(q + 1).to(torch.uint8), s.squeeze(-1).movedim(-1, 2)


def ternary_dequantize(codes: Tensor, scale: Tensor, group: int) -> Tensor:
    q = _by_group(codes, group) - 1
    return _from_groups(q * scale.movedim(2, -1)[..., None])


@dataclass
class Block:
    """One quantized block of N slots (lo .. lo + N − 1) of a layer.

    hard: (B, D) bool, the difficult key channels; k_hard: (codes, scale, zero) of those channels
    (B, Hkv, N, D_h) / (B, Hkv, N/G, D_h); k_easy: (codes, scale) of the easy channels' spectrum
    (B, Hkv, N, D_e) / (B, Hkv, N/G, D_e); salient: (B, S) slot offsets in the block of the STP tokens;
    v_rest: codes of the other tokens' values, (codes, scale) ternary or (codes, scale, zero) min-max, over
    the N − S tokens in slot order; v_salient: (codes, scale, zero) of the S salient tokens' values.
    """

    lo: int
    n: int
    hard: Tensor
    k_hard: tuple
    k_easy: tuple
    salient: Tensor
    v_rest: tuple
    v_salient: tuple


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, Hkv, N, C) at token offsets idx (B, M) (same for every head) -> (B, Hkv, M, C)."""
    return x.gather(2, idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _channels(x: Tensor, mask: Tensor) -> Tensor:
    """x (B, Hkv, N, D) at the channels where mask (B, D) is True (same count per row) -> (B, Hkv, N, D')."""
    idx = mask.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, : int(mask[0].sum())]
    idx = idx.sort(dim=-1).values
    return x.gather(3, idx[:, None, None, :].expand(-1, x.shape[1], x.shape[2], -1))


def _put_channels(out: Tensor, mask: Tensor, part: Tensor) -> Tensor:
    idx = mask.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, : part.shape[-1]].sort(dim=-1).values
    return out.scatter(3, idx[:, None, None, :].expand_as(part), part)


@dataclass
class VidKV(KVPolicy):
    """VidKV: mixed 2-bit / FFT 1-bit keys by channel, ternary values by channel, optional STP.

    Parameters
    ----------
    key_bits : float in [1, 2], default 1.5; a share key_bits − 1 of the channels gets ``difficult_bits``.
    difficult_bits : int in [1, 16], default 2, min-max width of the anomalous key channels.
    value_bits : 1.58 (default, ternary) or an int in [1, 16] (min-max per channel).
    group_size : int >= 1, default 32, G tokens per group.
    residual_length : int, default 128, R, a positive multiple of G.
    stp_ratio : float in [0, 1), default 0.0, share of the prompt's tokens whose values are protected.
    stp_bits : int in [1, 16], default 2, min-max width of the protected values.
    stp_window : int >= 1, default 32, prompt queries whose attention ranks the tokens for STP.
    """

    key_bits: float = 1.5
    difficult_bits: int = 2
    value_bits: float = 1.58
    group_size: int = 32
    residual_length: int = 128
    stp_ratio: float = 0.0
    stp_bits: int = 2
    stp_window: int = 32

    def __post_init__(self) -> None:
        if not 1.0 <= self.key_bits <= 2.0:
            raise ValueError(f"VidKV.key_bits must lie in [1, 2], got {self.key_bits}")
        if self.value_bits != 1.58 and (self.value_bits != int(self.value_bits) or not 1 <= self.value_bits <= 16):
            raise ValueError(f"VidKV.value_bits must be 1.58 (ternary) or an int in [1, 16], got {self.value_bits}")
        if not (1 <= self.difficult_bits <= 16 and 1 <= self.stp_bits <= 16):
            raise ValueError(f"VidKV.difficult_bits and stp_bits must lie in [1, 16], got "
                             f"{self.difficult_bits} and {self.stp_bits}")
        if self.group_size < 1 or self.residual_length < 1 or self.residual_length % self.group_size:
            raise ValueError(f"VidKV.residual_length must be a positive multiple of group_size >= 1, got "
                             f"{self.residual_length} and {self.group_size}")
        if not 0.0 <= self.stp_ratio < 1.0 or self.stp_window < 1:
            raise ValueError(f"VidKV needs stp_ratio in [0, 1) and stp_window >= 1, got {self.stp_ratio} and "
                             f"{self.stp_window}")

    def n_hard(self, head_dim: int) -> int:
        return int(head_dim * (self.key_bits - 1.0))

    def on_prefill(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        n = kv.n - kv.n % self.group_size
        kv.aux[BLOCKS], kv.aux[N_Q] = [], 0
        if n == 0:
            return kv
        salient = None
        if self.stp_ratio > 0 and (s := int(n * self.stp_ratio) // self.group_size * self.group_size):
            w = min(self.stp_window, kv.n)
            attn = window_attention(ctx.q[:, :, -w:], kv.k, ctx.scaling, kv.valid)    # (B, H, W, T)
            saliency = attn.mean(dim=(1, 2))[:, :n]                                  # (B, N)
            salient = saliency.topk(s, dim=-1).indices.sort(dim=-1).values           # (B, S)
        return self._flush(kv, n, salient)

    def on_append(self, ctx: StepCtx, kv: LayerKV) -> LayerKV:
        while kv.n - kv.aux[N_Q] >= self.residual_length:
            kv = self._flush(kv, self.residual_length, None)
        return kv

    def _flush(self, kv: LayerKV, n: int, salient: Tensor | None) -> LayerKV:
        """Quantize the next n slots as one block; their x̂ replaces them in k and v."""
        lo = kv.aux[N_Q]
        k, v = kv.k[:, :, lo:lo + n], kv.v[:, :, lo:lo + n]                          # (B, Hkv, N, D)
        if salient is None:
            salient = torch.zeros(k.shape[0], 0, dtype=torch.long, device=k.device)
        block = self.quantize(lo, k, v, salient)
        k_hat, v_hat = self.dequantize(block, n, k.shape[-1])
        kv.aux[BLOCKS] = [*kv.aux[BLOCKS], block]
        kv.aux[N_Q] = lo + n
        new_k, new_v = kv.k.clone(), kv.v.clone()
        new_k[:, :, lo:lo + n], new_v[:, :, lo:lo + n] = k_hat.to(kv.k.dtype), v_hat.to(kv.v.dtype)
        return replace(kv, k=new_k, v=new_v)

    def quantize(self, lo: int, k: Tensor, v: Tensor, salient: Tensor) -> Block:
        """Quantize keys / values (B, Hkv, N, D) of one block; salient (B, S) offsets of the STP tokens."""
        b, _, n, d = k.shape
        g = self.group_size
        kf = k.float()
        span = kf.amax(dim=(1, 2)) - kf.amin(dim=(1, 2))                             # (B, D)
        top = span.topk(self.n_hard(d), dim=-1).indices
        hard = torch.zeros(b, d, dtype=torch.bool, device=k.device).scatter_(-1, top, True)
        k_hard = quantize_groups(_channels(kf, hard), self.difficult_bits, g, 2)
        easy = _channels(kf, ~hard)                                                  # (B, Hkv, N, D_e)
        k_easy = sign_quantize(spectrum(easy) if easy.shape[-1] else easy, g)
        rest = self._rest(salient, n)
        v_rest = _take(v.float(), rest)
        v_rest = (ternary_quantize(v_rest, g) if self.value_bits == 1.58
                  else quantize_groups(v_rest, int(self.value_bits), g, 2))
        v_salient = quantize_groups(_take(v.float(), salient), self.stp_bits, g, 2)
        return Block(lo, n, hard, k_hard, k_easy, salient, v_rest, v_salient)

    def dequantize(self, block: Block, n: int, d: int) -> tuple[Tensor, Tensor]:
        """x̂ of a block's keys and values: (B, Hkv, N, D) fp32 each."""
        g = self.group_size
        codes = block.k_hard[0]
        b, hkv = codes.shape[:2]
        k = codes.new_zeros(b, hkv, n, d, dtype=torch.float32)
        k = _put_channels(k, block.hard, dequantize_groups(*block.k_hard, g, 2))
        if d_e := d - self.n_hard(d):
            k = _put_channels(k, ~block.hard, from_spectrum(sign_dequantize(*block.k_easy, g), d_e))
        v_rest = (ternary_dequantize(*block.v_rest, g) if self.value_bits == 1.58
                  else dequantize_groups(*block.v_rest, g, 2))
        v = k.new_zeros(b, hkv, n, d)
        for idx, part in ((self._rest(block.salient, n), v_rest),
                          (block.salient, dequantize_groups(*block.v_salient, g, 2))):
            v = v.scatter(2, idx[:, None, :, None].expand(-1, hkv, -1, d), part)
        return k, v

    @staticmethod
    def _rest(salient: Tensor, n: int) -> Tensor:
        """(B, N − S) offsets of the non-salient tokens, ascending."""
        keep = torch.ones(salient.shape[0], n, dtype=torch.bool, device=salient.device).scatter_(-1, salient, False)
        return keep.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, : n - salient.shape[1]].sort(
            dim=-1).values

    def memory(self, kv: LayerKV) -> KVMemory:
        """Storage of this layer's cache: its blocks plus the full-precision residual."""
        b, hkv, t, d = kv.k.shape
        out = KVMemory(0, 0, FP_BITS * 2 * b * hkv * d * (t - kv.aux[N_Q]), 2 * b * hkv * d * (t - kv.aux[N_Q]))
        for block in kv.aux[BLOCKS]:
            out = out + self._block_memory(b, hkv, d, block.n, block.salient.shape[1])
        return out

    def cache_memory(self, n_tokens: int, n_kv_heads: int, head_dim: int, layer_idx: int = 0,
                     num_layers: int = 1) -> KVMemory:
        """Storage of one layer (batch 1) right after a prefill of ``n_tokens``."""
        n = n_tokens - n_tokens % self.group_size
        fp = n_tokens - n
        out = KVMemory(0, 0, FP_BITS * 2 * n_kv_heads * head_dim * fp, 2 * n_kv_heads * head_dim * fp)
        if n == 0:
            return out
        s = int(n * self.stp_ratio) // self.group_size * self.group_size if self.stp_ratio > 0 else 0
        return out + self._block_memory(1, n_kv_heads, head_dim, n, s)

    def _block_memory(self, b: int, hkv: int, d: int, n: int, s: int) -> KVMemory:
        """One block of n tokens, s of them STP-protected (the formula in the module docstring)."""
        rows, groups = b * hkv, n // self.group_size
        d_h = self.n_hard(d)
        d_e = d - d_h
        code = rows * (self.difficult_bits * n * d_h + n * d_e)
        param = FP_BITS * rows * (2 * groups * d_h + groups * d_e) + (b * d if 0 < d_h < d else 0)
        r = n - s
        if self.value_bits == 1.58:
            code += TERNARY_BITS * rows * r * d
            param += FP_BITS * rows * (r // self.group_size) * d
        else:
            code += int(self.value_bits) * rows * r * d
            param += 2 * FP_BITS * rows * (r // self.group_size) * d
        code += self.stp_bits * rows * s * d
        param += 2 * FP_BITS * rows * (s // self.group_size) * d + (b * n if s else 0)
        return KVMemory(code, param, 0, 2 * rows * n * d)
