"""A small masked-diffusion LM (LLaDA-style) for Elastic-Cache: bidirectional transformer over ASCII characters.

No small pretrained diffusion LM is installable here, so this is built and trained on the machine, on offline prose
(``plaintext_ref.eval.corpus``: Debian's python3.11-doc sources).

Model: token + learned position embeddings, ``n_layers`` pre-LayerNorm blocks (bidirectional multi-head attention,
GELU MLP), final LayerNorm, tied output head. Vocabulary: the 128 ASCII codes (other characters map to '?') plus
MASK (id 128).
Training (LLaDA, Nie et al. 2025, arXiv 2502.09992, eq. 3): draw t ~ U(ε, 1) per sequence, replace each token by
MASK with probability t, and minimise ``(1/t) Σ_i 1[x_t^i = MASK] · −log p(x_0^i | x_t)`` averaged over tokens.
Sampling (LLaDA's semi-autoregressive low-confidence remasking): the answer starts all MASK; blocks of
``block_len`` positions are decoded left to right, ``tokens_per_step`` per denoising step, each step unmasking the
masked positions of the current block with the highest max-softmax confidence (greedy).

The layer pieces (``qkv``, ``attend``, ``finish``) are exposed so Elastic-Cache can run a layer on a subset of
positions over cached K/V; :meth:`DiffusionLM.forward_from` is the one full-sequence path both decoders use.
Shapes: B batch · T positions · E width · H heads · D head dim · V vocabulary.

    python -m plaintext_ref.reuse.diffusion_lm --steps 1500 --out /tmp/dlm.pt   # trains on CPU in minutes
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)
MASK_ID = 128
WEIGHTS = Path(__file__).resolve().parent / "data" / "dlm_tiny.pt"


def encode(text: str) -> Tensor:
    return torch.tensor([b if b < 128 else ord("?") for b in text.encode("ascii", "replace")], dtype=torch.long)


def decode(ids: Tensor | list[int]) -> str:
    return "".join("_" if int(i) == MASK_ID else chr(int(i)) for i in ids)


@dataclass(frozen=True)
class DLMConfig:
    vocab: int = 129
    d_model: int = 96
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 384
    max_len: int = 160

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be a multiple of n_heads {self.n_heads}")


class Block(nn.Module):
    def __init__(self, cfg: DLMConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))


class DiffusionLM(nn.Module):
    def __init__(self, cfg: DLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head_dim = cfg.d_model // cfg.n_heads
        for emb in (self.tok, self.pos):     # GPT-2 init: N(0, 1) embeddings with a tied head start at loss ≈ 80
            nn.init.normal_(emb.weight, std=0.02)

    def embed(self, ids: Tensor, pos: Tensor) -> Tensor:
        """ids (B, S), pos (S,) -> (B, S, E)."""
        return self.tok(ids) + self.pos(pos)[None]

    def qkv(self, l: int, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, S, E) -> q, k, v (B, H, S, D) of layer l."""
        b, s, _ = h.shape
        q, k, v = self.blocks[l].qkv(self.blocks[l].norm1(h)).view(b, s, 3, self.cfg.n_heads, self.head_dim).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, probs: bool = False) -> tuple[Tensor, Tensor | None]:
        """Bidirectional attention (B, H, S, D) x (B, H, T, D) -> (B, H, S, D), and the weights (B, H, S, T) if asked
        (computed beside the output, which is the same sdpa call either way)."""
        out = F.scaled_dot_product_attention(q, k, v)
        if not probs:
            return out, None
        return out, ((q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)).softmax(-1)

    def finish(self, l: int, h: Tensor, a: Tensor) -> Tensor:
        b, s, _ = h.shape
        blk = self.blocks[l]
        h = h + blk.out(a.transpose(1, 2).reshape(b, s, -1))
        return h + blk.mlp(blk.norm2(h))

    def logits(self, h: Tensor) -> Tensor:
        return self.norm(h) @ self.tok.weight.T

    def forward_from(self, h: Tensor, start: int = 0, probs: bool = False
                     ) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]], list[Tensor | None]]:
        """Layers start..L−1 over every position: returns the last hidden (B, T, E), per layer (input hidden, k, v)
        and per layer attention weights (when ``probs``)."""
        states, weights = [], []
        for l in range(start, self.cfg.n_layers):
            q, k, v = self.qkv(l, h)
            a, w = self.attend(q, k, v, probs)
            states.append((h, k, v))
            weights.append(w)
            h = self.finish(l, h, a)
        return h, states, weights

    def forward(self, ids: Tensor) -> Tensor:
        """ids (B, T) -> logits (B, T, V)."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.logits(self.forward_from(self.embed(ids, pos))[0])


def diffusion_loss(model: DiffusionLM, x0: Tensor, gen: torch.Generator, eps: float = 1e-3) -> Tensor:
    """LLaDA's masked-diffusion loss on clean sequences x0 (B, T)."""
    b, t = x0.shape
    ratio = eps + (1 - eps) * torch.rand(b, 1, generator=gen)                      # (B, 1)
    masked = torch.rand(b, t, generator=gen) < ratio                               # (B, T)
    xt = torch.where(masked, torch.full_like(x0, MASK_ID), x0)
    ce = F.cross_entropy(model(xt).transpose(1, 2), x0, reduction="none")          # (B, T)
    return (ce * masked / ratio).sum() / (b * t)


def train(text: str, cfg: DLMConfig = DLMConfig(), steps: int = 1500, batch: int = 32, seq_len: int = 128,
          lr: float = 2e-3, seed: int = 0, log_every: int = 100) -> DiffusionLM:
    """Train a seeded DiffusionLM on ``text`` (random windows) with AdamW and a cosine schedule."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = encode(text)
    model = DiffusionLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    start = time.time()
    for i in range(steps):
        offs = torch.randint(0, data.numel() - seq_len, (batch,), generator=gen)
        x0 = torch.stack([data[o:o + seq_len] for o in offs.tolist()])
        loss = diffusion_loss(model, x0, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (i % log_every == 0 or i == steps - 1):
            log.info("step %d loss %.3f (%.0f s)", i, loss.item(), time.time() - start)
    return model.eval()


def save(model: DiffusionLM, path: str | Path, meta: dict | None = None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() for k, v in model.state_dict().items()}   # fp16 on disk: under 1 MB, loaded as fp32
    torch.save({"config": asdict(model.cfg), "state": state, "meta": meta or {}}, path)


def load(path: str | Path = WEIGHTS) -> DiffusionLM:
    saved = torch.load(path, weights_only=False)
    model = DiffusionLM(DLMConfig(**saved["config"]))
    model.load_state_dict({k: v.float() for k, v in saved["state"].items()})
    return model.eval()


@torch.no_grad()
def generate(model: DiffusionLM, prompt: Tensor, gen_len: int, block_len: int = 16, tokens_per_step: int = 1
             ) -> tuple[Tensor, dict]:
    """Baseline: every denoising step recomputes Q/K/V of every position at every layer.

    prompt (P,) -> the full sequence (P + gen_len,) and counters (steps, token_layers computed).
    """
    x = torch.cat([prompt, torch.full((gen_len,), MASK_ID, dtype=torch.long)])[None]
    pos = torch.arange(x.shape[1])
    steps = 0
    for lo in range(prompt.numel(), x.shape[1], block_len):
        hi = min(lo + block_len, x.shape[1])
        while bool((x[0, lo:hi] == MASK_ID).any()):
            logits = model.logits(model.forward_from(model.embed(x, pos))[0])
            x = unmask(x, logits, lo, hi, tokens_per_step)
            steps += 1
    return x[0], dict(steps=steps, token_layers=steps * x.shape[1] * model.cfg.n_layers)


def unmask(x: Tensor, logits: Tensor, lo: int, hi: int, k: int) -> Tensor:
    """Low-confidence remasking: unmask the k most confident masked positions of x[:, lo:hi] (greedy tokens).

    logits (1, hi − lo or T, V): rows for the whole sequence or for the block only.
    """
    block = logits[0, lo:hi] if logits.shape[1] == x.shape[1] else logits[0]
    block = block.clone()
    block[:, MASK_ID] = float("-inf")
    conf, tok = block.softmax(-1).max(-1)
    masked = x[0, lo:hi] == MASK_ID
    conf = conf.masked_fill(~masked, float("-inf"))
    pick = conf.topk(min(k, int(masked.sum()))).indices
    x = x.clone()
    x[0, lo + pick] = tok[pick]
    return x


def main(argv: list[str] | None = None) -> None:
    from plaintext_ref.eval.corpus import load_corpus
    p = argparse.ArgumentParser(description="train the tiny masked-diffusion LM on offline prose")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(WEIGHTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    text = load_corpus(max_chars=1_200_000).text
    train_text = text[: int(len(text) * 0.9)]
    start = time.time()
    model = train(train_text, steps=args.steps, batch=args.batch, seed=args.seed)
    save(model, args.out, {"steps": args.steps, "batch": args.batch, "seed": args.seed, "train_chars": len(train_text),
                           "seconds": round(time.time() - start, 1), "threads": args.threads})
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {args.out}: {n} parameters, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
