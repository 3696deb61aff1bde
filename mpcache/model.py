"""Secret-shared decoder transformers: the Llama family and the GPT-2 family, on CrypTen shares.

Follows gpt-fast's ``model.py`` with shared tensors: ``SecureTransformer`` → ``SecureBlock`` →
``SecureAttention`` / ``SecureMLP`` / ``SecureRMSNorm`` | ``SecureLayerNorm``, in the same order of
operations as the HF implementations (``LlamaForCausalLM``, ``GPT2LMHeadModel``). Weights are shared
by the model owner (``share_model``) as fixed-mask operands, so every weight matmul opens only its
activation side; tokens arrive as secret one-hot rows (the embedding is ``[onehot] @ E``), positions
are public. Public: ``ModelArgs`` (architecture, shapes), sequence lengths, positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from mpcache.cache import Sequence
from plaintext_ref.models import max_context, model_family
from protocols.compat import comm, crypten
from protocols.cost import Meter
from protocols import lut_argmax
from protocols.config import active_config
from protocols.fixed_mask import (FixedMaskOperand, StockOperand, fixed_matmul, fixed_matmul_raw, fuses_truncation,
                                   trunc_matmul_step)
from protocols.lut_nonlinear import rms_norm_of_squares, silu_mul_raw
from protocols.nonlinear import gelu_tanh, layer_norm, rms_norm, silu_mul
from protocols.rounds import share_of, to_secret, together
from protocols.truncation import Untruncated, exact_div_many, trunc_step
from protocols.types import Public, Secret

if TYPE_CHECKING:
    from mpcache.policy.base import MPCPolicy

Progress = Callable[[int, int], None]  # progress(done, total), for a progress bar


@dataclass(frozen=True)
class ModelArgs:
    """Public architecture of a decoder, derived from its HF config (``from_hf``).

    family: "llama" (RMSNorm, RoPE, GQA, SwiGLU) or "gpt2" (LayerNorm, learned positions, GELU-tanh).
    """

    family: str
    vocab_size: int  # V
    dim: int  # E
    n_layers: int  # L
    n_heads: int  # H
    n_kv_heads: int  # Hkv
    head_dim: int  # D
    hidden_dim: int  # F
    norm_eps: float
    max_seq_len: int
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    tie_embeddings: bool = True  # LM head = token embedding (one operand serves both)

    def __post_init__(self) -> None:
        if self.family not in ("llama", "gpt2"):
            raise ValueError(f"family must be 'llama' or 'gpt2', got {self.family!r}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "hidden_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE halves), got {self.head_dim}")

    @property
    def n_groups(self) -> int:  # G = H / Hkv
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, config) -> ModelArgs:
        family = model_family(config)
        if family == "gpt2":
            act = getattr(config, "activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ValueError(f"GPT-2 activation {act!r} unsupported (only the tanh GELU)")
            return cls("gpt2", config.vocab_size, config.n_embd, config.n_layer, config.n_head,
                       config.n_head, config.n_embd // config.n_head,
                       config.n_inner or 4 * config.n_embd, config.layer_norm_epsilon,
                       max_context(config), qkv_bias=True,
                       tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)))
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type {rope['rope_type']!r} unsupported (only 'default')")
        if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
            raise ValueError("only SiLU MLPs without bias are supported in the Llama family")
        return cls("llama", config.vocab_size, config.hidden_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads,
                   getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                   config.intermediate_size, config.rms_norm_eps, max_context(config),
                   rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
                   qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
                   tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


def _linear(x: Secret | Untruncated, w: FixedMaskOperand, b: Secret | None) -> Secret:
    """[x] [W]ᵀ (+ [b]), W in nn.Linear layout (out, in): (..., in) -> (..., out). An ``Untruncated`` x
    has its truncation fused into the product (``_linear_raw``) and the output truncated after."""
    if isinstance(x, Untruncated) and fuses_truncation(x, w, transpose_w=True):
        return to_secret(exact_div_many([(_linear_raw(x, w, b), 1 << 16)])[0])
    y = fixed_matmul(x.settle() if isinstance(x, Untruncated) else x, w, transpose_w=True)
    return y if b is None else y + b


def _linear_raw(x: Secret | Untruncated, w: FixedMaskOperand, b: Secret | None) -> torch.Tensor:
    """``_linear``'s share before its truncation: x·Wᵀ (+ b) @2^32 (plain int64). An ``Untruncated`` x
    (a norm's, the attention's or the gated MLP's output) costs no round of its own when
    ``fuses_truncation`` (a decode token: its truncation's round carries the product,
    ``trunc_matmul_step``), else it settles first (1 round)."""
    if isinstance(x, Untruncated) and fuses_truncation(x, w, transpose_w=True):
        (raw,) = together(trunc_matmul_step(x.share, x.d, w, transpose_w=True))
    else:
        raw = fixed_matmul_raw(x.settle() if isinstance(x, Untruncated) else x, w, transpose_w=True)
    return raw if b is None else raw + share_of(b) * (1 << 16)


class Residual(NamedTuple):
    """The residual stream [x] @2^16 and, when the truncation that made it also squared it
    (``trunc_step(square=True)``), [x²] @2^32 for the next norm."""

    x: Secret
    sq: torch.Tensor | None = None


def residual_add(x: Residual, raw: torch.Tensor) -> Residual:
    """x + raw/2^16 for a sublayer's untruncated output raw @2^32: one exact truncation of
    x·2^16 + raw, which also yields the square (1 round; the sublayer's own truncation is saved)."""
    ((h, sq),) = together(trunc_step([(raw + share_of(x.x) * (1 << 16), 1 << 16)], square=True))[0]
    return Residual(to_secret(h), sq)


Rope = tuple[torch.Tensor, torch.Tensor] | None  # public cos, sin (S, D); None for GPT-2


class SecureRMSNorm:
    """RMSNorm; ``weight`` None when it is folded into the next matrix (``_norm_folds``)."""

    def __init__(self, weight: Secret | None, eps: float) -> None:
        self.weight, self.eps = weight, eps

    def __call__(self, x: Residual) -> Secret | Untruncated:  # (B, S, E) -> (B, S, E)
        if x.sq is not None and self.weight is None:
            return rms_norm_of_squares(x.x, x.sq, self.eps)
        return rms_norm(x.x, self.weight, self.eps)


class SecureLayerNorm:
    """LayerNorm; ``weight``, ``bias`` None when they are folded into the next matrix."""

    def __init__(self, weight: Secret | None, bias: Secret | None, eps: float) -> None:
        self.weight, self.bias, self.eps = weight, bias, eps

    def __call__(self, x: Residual) -> Secret:  # (B, S, E) -> (B, S, E)
        return layer_norm(x.x, self.weight, self.bias, self.eps)


def rope_tables(args: ModelArgs, input_pos: Public) -> tuple[torch.Tensor, torch.Tensor]:
    """Public cos, sin (S, D) for positions input_pos (S,), HF's default RoPE (halves layout)."""
    steps = torch.arange(0, args.head_dim, 2, dtype=torch.float64, device=input_pos.device)
    inv_freq = 1.0 / (args.rope_theta ** (steps / args.head_dim))
    angles = input_pos.to(torch.float64)[:, None] * inv_freq[None, :]  # (S, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (S, D)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Secret, cos: torch.Tensor, sin: torch.Tensor) -> Secret:
    """[x]·cos + rotate_half([x])·sin with public cos, sin (S, D); x (B, heads, S, D). Local."""
    half = x.shape[-1] // 2
    rotated = crypten.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


_ROPE_FRAC = 20  # fraction bits of the public RoPE coefficients in the fused projection


def _rope_ring(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frac: int) -> torch.Tensor:
    """t·cos + rotate_half(t)·sin on ring shares with public cos, sin rounded to 2^−frac (exact, local)."""
    half = t.shape[-1] // 2
    ci = torch.round(cos.double() * 2**frac).long().to(t.device)
    si = torch.round(sin.double() * 2**frac).long().to(t.device)
    return t * ci + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * si


class SecureAttention:
    def __init__(self, args: ModelArgs, layer: int, wqkv: FixedMaskOperand, bqkv: Secret | None,
                 wo: FixedMaskOperand, bo: Secret | None, meter: Meter) -> None:
        self.args, self.layer, self.meter = args, layer, meter
        self.wqkv, self.bqkv, self.wo, self.bo = wqkv, bqkv, wo, bo

    def __call__(self, x: Secret | Untruncated, rope: Rope, mask: Public | None, seq: Sequence,
                 raw: bool = False) -> Secret | torch.Tensor:
        """x (B, S, E) -> (B, S, E); appends the S new K/V rows to this layer's cache in ``seq``, then
        one call into the sequence's policy. ``raw``: the output projection's untruncated share
        (``_linear_raw``) for ``residual_add``."""
        a = self.args
        B, S, _ = x.shape
        H, Hkv, D, G = a.n_heads, a.n_kv_heads, a.head_dim, a.n_groups
        if isinstance(self.wqkv, FixedMaskOperand) and active_config().truncation == "exact":
            q, k, v = self._qkv_fused(x, rope)
        else:
            with self.meter.stage("qkv"):
                qkv = _linear(x, self.wqkv, self.bqkv)  # (B, S, E) -> (B, S, (H + 2Hkv)·D)
            q = qkv[..., : H * D].reshape(B, S, H, D).transpose(1, 2)  # (B, H, S, D)
            k = qkv[..., H * D: (H + Hkv) * D].reshape(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv, S, D)
            v = qkv[..., (H + Hkv) * D:].reshape(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv, S, D)
            if rope is not None:
                with self.meter.stage("rope"):
                    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            q = q * (1.0 / math.sqrt(D))
        cache = seq.caches[self.layer]
        with self.meter.stage("attention"):
            cache.append(k, v)
        q = q.reshape(B, Hkv, G * S, D)  # query heads h = kv·G + g
        y = seq.policy.attend(self.layer, q, cache, mask, seq.partner(self.layer))  # (B, Hkv, G·S, D)
        rows = lambda t: t.reshape(B, H, S, D).transpose(1, 2).reshape(B, S, H * D)  # noqa: E731
        y = y.map(rows) if isinstance(y, Untruncated) else rows(y)
        with self.meter.stage("attention"):
            if raw:
                return _linear_raw(y, self.wo, self.bo)
            return _linear(y, self.wo, self.bo)  # (B, S, H·D) -> (B, S, E)

    def _qkv_fused(self, x: Secret | Untruncated, rope: Rope) -> tuple[Secret, Secret, Secret]:
        """q/√D, k (RoPE'd) and v (B, heads, S, D) with one truncation round after the projection.

        The projection stays at 2^32 (``fixed_matmul_raw``); RoPE's public cos, sin (and 1/√D for q)
        multiply those ring integers as 2^−20-rounded integers, and one exact truncation per tensor
        (all in one round) brings q, k (2^52) and v (2^32) back to 2^16 (values far below 2^62/2^52).
        """
        a = self.args
        B, S, _ = x.shape
        H, Hkv, D = a.n_heads, a.n_kv_heads, a.head_dim
        with self.meter.stage("qkv"):
            raw = _linear_raw(x, self.wqkv, self.bqkv)  # (B, S, (H + 2Hkv)·D) @2^32

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.reshape(B, S, n, D).transpose(1, 2)

        q, k, v = heads(raw[..., :H * D], H), heads(raw[..., H * D:(H + Hkv) * D], Hkv), heads(raw[..., (H + Hkv) * D:], Hkv)
        c, inv = _ROPE_FRAC, 1.0 / math.sqrt(D)
        with self.meter.stage("rope"):
            if rope is None:
                q, k = q * round(inv * 2**c), k * (1 << c)
            else:
                cos, sin = rope
                q, k = _rope_ring(q, cos * inv, sin * inv, c), _rope_ring(k, cos, sin, c)
            q, k, v = exact_div_many([(q, 1 << (16 + c)), (k, 1 << (16 + c)), (v, 1 << 16)])
        return to_secret(q), to_secret(k), to_secret(v)


class SecureMLP:
    """Llama: down(silu(gate(x)) · up(x)) with gate|up fused; GPT-2: proj(gelu_tanh(fc(x)))."""

    def __init__(self, args: ModelArgs, w_in: FixedMaskOperand, b_in: Secret | None,
                 w_out: FixedMaskOperand, b_out: Secret | None, meter: Meter) -> None:
        self.args, self.meter = args, meter
        self.w_in, self.b_in, self.w_out, self.b_out = w_in, b_in, w_out, b_out

    def __call__(self, x: Secret | Untruncated, raw: bool = False) -> Secret | torch.Tensor:
        """``raw`` (the fused Llama block): silu(gate)·up straight from the untruncated projection
        (``silu_mul_raw``) and the down projection's untruncated share (``_linear_raw``) for
        ``residual_add``."""
        F = self.args.hidden_dim
        with self.meter.stage("mlp"):
            if raw:
                g = _linear_raw(x, self.w_in, self.b_in)  # (B, S, E) -> (B, S, 2F) @2^32
                return _linear_raw(silu_mul_raw(g[..., :F], g[..., F:]), self.w_out, self.b_out)
            h = _linear(x, self.w_in, self.b_in)  # (B, S, E) -> (B, S, 2F) llama | (B, S, F) gpt2
            h = silu_mul(h[..., :F], h[..., F:]) if self.args.family == "llama" else gelu_tanh(h)
            return _linear(h, self.w_out, self.b_out)  # (B, S, F) -> (B, S, E)


Norm = SecureRMSNorm | SecureLayerNorm


class SecureBlock:
    """Pre-norm block. In the Llama family with look-ups, exact truncation and fixed-mask weights
    (``fuses_residual``), each sublayer's output stays untruncated and ``residual_add`` truncates it
    together with the residual, its square serving the next norm (``rms_norm_of_squares``: no
    squaring round)."""

    def __init__(self, attention_norm: Norm, attention: SecureAttention, ffn_norm: Norm, mlp: SecureMLP,
                 meter: Meter) -> None:
        self.attention_norm, self.attention, self.ffn_norm, self.mlp = attention_norm, attention, ffn_norm, mlp
        self.meter = meter

    def fuses_residual(self) -> bool:
        cfg = active_config()
        return (self.attention.args.family == "llama" and cfg.nonlinear == "lut" and cfg.truncation == "exact"
                and isinstance(self.attention.wo, FixedMaskOperand))

    def __call__(self, x: Residual, rope: Rope, mask: Public | None, seq: Sequence) -> Residual:  # (B, S, E)
        with self.meter.stage("norm"):
            xn = self.attention_norm(x)
        if not self.fuses_residual():
            h = Residual(x.x + self.attention(xn, rope, mask, seq))
            with self.meter.stage("norm"):
                hn = self.ffn_norm(h)
            return Residual(h.x + self.mlp(hn))
        raw = self.attention(xn, rope, mask, seq, raw=True)
        with self.meter.stage("norm"):
            h = residual_add(x, raw)
            hn = self.ffn_norm(h)
        raw = self.mlp(hn, raw=True)
        with self.meter.stage("norm"):
            return residual_add(h, raw)


class SecureTransformer:
    """Decoder on shares (the weights); ``forward`` consumes secret one-hot tokens and fills the caches
    of a ``Sequence``, which holds all per-generation state."""

    def __init__(self, args: ModelArgs, tok_embeddings: FixedMaskOperand, pos_embeddings: Secret | None,
                 layers: list[SecureBlock], norm: Norm, output: FixedMaskOperand, meter: Meter,
                 logit_shift: int = 0) -> None:
        self.args, self.tok_embeddings, self.pos_embeddings = args, tok_embeddings, pos_embeddings
        self.layers, self.norm, self.output, self.meter = layers, norm, output, meter
        self.logit_shift = logit_shift  # public: the look-up argmax's scale (``logit_shift``)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.device

    def new_sequence(self, policy: MPCPolicy) -> Sequence:
        """Empty per-layer caches for one generation under ``policy`` (an ``MPCPolicy``)."""
        return Sequence(self.args.n_layers, policy, type(self.tok_embeddings))  # stock weights: stock cache

    def forward(self, onehot: Secret, input_pos: Public, seq: Sequence,
                hidden_states: list[Secret] | None = None, progress: Progress | None = None) -> Secret:
        """[onehot] (B, S, V) at public positions input_pos (S,) -> last-position [logits] (B, 1, V).

        Appends the S tokens to every layer's cache in ``seq``. ``hidden_states``, when given,
        receives the residual stream after the embedding and after each block (B, S, E) (for tests).
        ``progress(done, n_layers)`` is called after each block.
        """
        S, T = onehot.shape[1], seq.length + onehot.shape[1]
        # positions are logical: a policy may have evicted cached tokens (static eviction), never added
        assert int(input_pos[-1]) >= T - 1, f"positions {input_pos.tolist()} end before cache length {T - 1}"
        input_pos = input_pos.to(self.device)
        with self.meter.stage("embedding"):
            x = fixed_matmul(onehot, self.tok_embeddings)  # (B, S, V) x (V, E) -> (B, S, E)
            if self.pos_embeddings is not None:
                x = x + self.pos_embeddings[input_pos]  # public rows of [wpe]: local
        rope = rope_tables(self.args, input_pos) if self.args.family == "llama" else None
        mask = causal_mask(input_pos, T, self.args.n_groups) if S > 1 else None
        stream = Residual(x)
        for i, block in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(stream.x)
            stream = block(stream, rope, mask, seq)
            if progress:
                progress(i + 1, len(self.layers))
        if hidden_states is not None:
            hidden_states.append(stream.x)
        with self.meter.stage("norm"):
            x = self.norm(Residual(stream.x[:, -1:, :]))  # only the last position feeds the LM head
        with self.meter.stage("lm_head"):
            return fixed_matmul(x, self.output, transpose_w=True)  # (B, 1, E) x (E, V) -> (B, 1, V)


def causal_mask(input_pos: Public, T: int, groups: int) -> torch.Tensor:
    """Public 0/1 mask (G·S, T): query at position p sees cache slots 0..p; rows repeat per group."""
    mask = (torch.arange(T, device=input_pos.device)[None, :] <= input_pos[:, None]).float()  # (S, T)
    return mask.repeat(groups, 1)  # (G·S, T)


class Source(NamedTuple):
    """How one tensor of our layout is made from HF tensors ``hf`` (HF key -> HF shape): the only one
    as-is, several concatenated along dim 0 in this order (q|k|v, gate|up), or, with ``transpose``,
    the only one transposed (GPT-2's Conv1D stores (in, out); we use nn.Linear's (out, in))."""

    hf: dict[str, tuple[int, ...]]
    transpose: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        shapes = list(self.hf.values())
        if self.transpose:
            return shapes[0][::-1]
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def build(self, sd: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [sd[k] for k in self.hf]
        if self.transpose:
            return parts[0].t()
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _as_is(key: str, *shape: int) -> Source:
    return Source({key: shape})


def _conv1d(key: str, *shape: int) -> Source:
    return Source({key: shape}, transpose=True)


def _llama_layout(args: ModelArgs) -> dict[str, Source]:
    E, F, V, D = args.dim, args.hidden_dim, args.vocab_size, args.head_dim
    rows = {"q": args.n_heads * D, "k": args.n_kv_heads * D, "v": args.n_kv_heads * D}
    layout = {"tok": _as_is("model.embed_tokens.weight", V, E), "norm.w": _as_is("model.norm.weight", E)}
    if not args.tie_embeddings:
        layout["output"] = _as_is("lm_head.weight", V, E)
    for i in range(args.n_layers):
        p, q = f"model.layers.{i}.", f"{i}."
        a = p + "self_attn."
        layout.update({
            q + "wqkv": Source({f"{a}{n}_proj.weight": (r, E) for n, r in rows.items()}),
            q + "wo": _as_is(a + "o_proj.weight", E, rows["q"]),
            q + "n1.w": _as_is(p + "input_layernorm.weight", E),
            q + "n2.w": _as_is(p + "post_attention_layernorm.weight", E),
            q + "w_in": Source({p + "mlp.gate_proj.weight": (F, E), p + "mlp.up_proj.weight": (F, E)}),
            q + "w_out": _as_is(p + "mlp.down_proj.weight", E, F)})
        if args.qkv_bias:
            layout[q + "bqkv"] = Source({f"{a}{n}_proj.bias": (r,) for n, r in rows.items()})
    return layout


def _gpt2_layout(args: ModelArgs) -> dict[str, Source]:
    E, F, V = args.dim, args.hidden_dim, args.vocab_size
    layout = {"tok": _as_is("transformer.wte.weight", V, E), "norm.w": _as_is("transformer.ln_f.weight", E)}
    if not args.tie_embeddings:
        layout["output"] = _as_is("lm_head.weight", V, E)
    layout.update({"pos": _as_is("transformer.wpe.weight", args.max_seq_len, E),
                   "norm.b": _as_is("transformer.ln_f.bias", E)})
    for i in range(args.n_layers):
        p, q = f"transformer.h.{i}.", f"{i}."
        layout.update({
            q + "wqkv": _conv1d(p + "attn.c_attn.weight", E, 3 * E),
            q + "wo": _conv1d(p + "attn.c_proj.weight", E, E),
            q + "n1.w": _as_is(p + "ln_1.weight", E),
            q + "n2.w": _as_is(p + "ln_2.weight", E),
            q + "w_in": _conv1d(p + "mlp.c_fc.weight", E, F),
            q + "w_out": _conv1d(p + "mlp.c_proj.weight", F, E),
            q + "bqkv": _as_is(p + "attn.c_attn.bias", 3 * E),
            q + "bo": _as_is(p + "attn.c_proj.bias", E),
            q + "b_in": _as_is(p + "mlp.c_fc.bias", F),
            q + "b_out": _as_is(p + "mlp.c_proj.bias", E),
            q + "n1.b": _as_is(p + "ln_1.bias", E),
            q + "n2.b": _as_is(p + "ln_2.bias", E)})
    return layout


def _layout(args: ModelArgs) -> dict[str, Source]:
    """Our key -> its ``Source``, in sharing order (``share_model`` shares in this order, which fixes
    the masks drawn and the bytes and rounds logged). The checkpoint layout is written only here."""
    return _gpt2_layout(args) if args.family == "gpt2" else _llama_layout(args)


def _norm_folds(args: ModelArgs) -> dict[str, tuple[str, str]]:
    """Per-layer norm prefix -> (the matrix it feeds, that matrix's bias): the norm's weight w (and
    LayerNorm's bias β) fold into it, W·(x̂·w + β) = (W·diag(w))·x̂ + W·β, so the secure norm only
    normalises (no x·w product, no truncation: ``protocols.lut_nonlinear``). The final norm feeds
    the (tied) LM head and keeps its weight."""
    return {f"{i}.{n}": (f"{i}.{m}", f"{i}.{b}") for i in range(args.n_layers)
            for n, m, b in (("n1", "wqkv", "bqkv"), ("n2", "w_in", "b_in"))}


def _folded(args: ModelArgs) -> set[str]:
    """Layout keys that are folded into a matrix and not shared themselves."""
    return {f"{n}.{k}" for n in _norm_folds(args) for k in ("w", "b")}


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """HF state-dict key -> shape that ``share_model`` requires (a tied LM head is not listed)."""
    return {k: s for src in _layout(args).values() for k, s in src.hf.items()}


def shared_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Our key -> public shape, in sharing order (what the parties without the model allocate)."""
    folded = _folded(args)
    return {name: src.shape for name, src in _layout(args).items() if name not in folded}


def _fused(args: ModelArgs, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model owner only: HF tensors -> our layout, keyed and ordered as ``shared_shapes``, with the
    per-layer norms folded into the matrices they feed (``_norm_folds``; in float64, then float32)."""
    built = {name: src.build(sd) for name, src in _layout(args).items()}
    for norm, (mat, bias) in _norm_folds(args).items():
        w = built[mat].double()
        if norm + ".b" in built:
            built[bias] = (built[bias].double() + w @ built[norm + ".b"].double()).float()
        built[mat] = (w * built[norm + ".w"].double()).float()
    folded = _folded(args)
    return {name: t for name, t in built.items() if name not in folded}


def check_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> None:
    """Assert every expected key is present with its shape (nanoGPT ``from_pretrained`` style)."""
    expected = expected_shapes(args)
    missing = sorted(set(expected) - set(sd))
    assert not missing, f"state dict lacks {len(missing)} keys, e.g. {missing[:3]}"
    bad = {k: (tuple(sd[k].shape), s) for k, s in expected.items() if tuple(sd[k].shape) != s}
    assert not bad, f"shape mismatch (got, expected): {dict(list(bad.items())[:3])}"
    known = set(expected) | {"lm_head.weight"}
    extra = sorted(k for k in sd if k not in known and not k.endswith((".attn.bias", ".attn.masked_bias")))
    assert not extra, f"unexpected state-dict keys: {extra[:5]}"


def share_model(state_dict: dict[str, torch.Tensor] | None, args: ModelArgs, meter: Meter,
                src: int = 1, device: str | torch.device = "cpu", fixed_masks: bool = True,
                progress: Progress | None = None) -> SecureTransformer:
    """Secret-share a model: party ``src`` passes the HF state dict, every other party ``None``.

    Matrices become fixed-mask operands (δ = W − B opened once here), vectors plain shares, all on
    ``device`` (both parties may share one GPU). Layout: nn.Linear's (out, in) everywhere — GPT-2's
    Conv1D weights (in, out) are transposed — with q|k|v and gate|up fused so that each activation
    is opened once per block. Public: ``args`` and therefore every shape.
    Cost: 16·(#matrix parameters) logged bytes per party, once; nothing per token.
    ``fixed_masks=False`` is the stock-CrypTen baseline (for benchmarks): matrices and the KV cache
    become ``StockOperand``s, so set-up opens nothing and every product opens its weight or K/V.
    ``progress(done, total)`` is called after each shared tensor.
    """
    rank = comm.get().get_rank()
    operand = FixedMaskOperand if fixed_masks else StockOperand
    owned: dict[str, torch.Tensor] = {}
    if rank == src:
        assert state_dict is not None, f"party {src} owns the model and must pass its state dict"
        check_state_dict(state_dict, args)
        owned = {k: v.detach().float() for k, v in _fused(args, state_dict).items()}
    shift = comm.get().broadcast_obj(logit_shift(owned) if rank == src else None, src)
    shares: dict[str, object] = {}
    layout = shared_shapes(args)
    for i, (name, shape) in enumerate(layout.items()):
        value = owned[name] if rank == src else torch.zeros(shape)
        secret = crypten.cryptensor(value.to(device), src=src, device=device)
        shares[name] = operand(secret) if len(shape) == 2 and name != "pos" else secret
        if progress:
            progress(i + 1, len(layout))
    return _assemble(args, shares, meter, shift)


def _assemble(args: ModelArgs, s: dict, meter: Meter, logit_shift: int) -> SecureTransformer:
    def norm(prefix: str) -> Norm:  # a folded norm (``_norm_folds``) has no weight or bias here
        if args.family == "gpt2":
            return SecureLayerNorm(s.get(prefix + ".w"), s.get(prefix + ".b"), args.norm_eps)
        return SecureRMSNorm(s.get(prefix + ".w"), args.norm_eps)

    layers = []
    for i in range(args.n_layers):
        q = f"{i}."
        attn = SecureAttention(args, i, s[q + "wqkv"], s.get(q + "bqkv"), s[q + "wo"], s.get(q + "bo"), meter)
        mlp = SecureMLP(args, s[q + "w_in"], s.get(q + "b_in"), s[q + "w_out"], s.get(q + "b_out"), meter)
        layers.append(SecureBlock(norm(q + "n1"), attn, norm(q + "n2"), mlp, meter))
    return SecureTransformer(args, s["tok"], s.get("pos"), layers, norm("norm"), s.get("output", s["tok"]), meter,
                             logit_shift)


def logit_shift(fused: dict[str, torch.Tensor]) -> int:
    """Model owner: the largest k ≤ 16 with 2^k·B ≤ ``protocols.lut_argmax.DOMAIN`` for the weight
    bound B ≥ |logit| = |W_v·(x̂·w + β)|, B = max_v ‖W_v‖·(√E·max|w| + ‖β‖) (‖x̂‖ ≤ √E after the final
    norm), else 0. Public (sent once at set-up): it reveals a power-of-two bound of the LM head's
    scale. Tiny random models (B ≈ 2.6) get k = 4, so their near-tied logits are decided at a 16×
    finer step; SmolLM2-135M (B ≈ 600, measured |logits| ≤ 41) keeps k = 0."""
    w_out = fused.get("output", fused["tok"]).double()
    gain = w_out.shape[1] ** 0.5 * fused["norm.w"].double().abs().max()
    if "norm.b" in fused:
        gain = gain + fused["norm.b"].double().norm()
    bound = float(w_out.norm(dim=1).max() * gain)
    k = math.floor(math.log2(lut_argmax.DOMAIN / bound)) if bound > 0 else 16
    return max(0, min(16, k))
