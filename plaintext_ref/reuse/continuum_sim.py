"""Deterministic discrete-event simulation of multi-turn agent programs on one LLM serving engine (Continuum §10).

Workload (:func:`make_workload`, every draw from ``random.Random(seed)`` up front, so a seed fixes the whole run).
Programs arrive as a Poisson process (``arrival_rate`` per second). A program has ``turns`` turns; turn 1's prompt is
``first_prompt`` tokens, each later turn appends the previous output plus ``append`` tokens (tool result + message);
each turn generates ``output`` tokens, and every turn but the last ends in a tool call whose duration is drawn from
that tool's distribution (:data:`TOOLS`, stated below; a program draws a tool per turn uniformly from its mix).

Engine: iteration-level continuous batching. One iteration takes
``t_iter = t_base + t_prefill · (prefill tokens admitted) + t_decode · (running sequences)``; admitted requests
prefill their uncached tokens in the iteration they are admitted and then emit one token per iteration. KV memory
holds ``memory_tokens`` slots: a running request reserves context + output; cache entries (one per program: its
context after its last turn) hold their tokens until dropped. Admission walks the waiting queue in priority order and
stops at the first request that does not fit (head-of-line, as vLLM), after evicting unpinned entries LRU-first and,
for policies that pin, unpinning pinned ones latest-expiry first. A request whose program has an entry reuses it
(prefix hit: only the new tokens are prefilled).

Policies (:data:`POLICIES`):
* ``no_pin`` — evict on finish: a turn's KV is freed when it ends (TTL = 0, no prefix cache).
* ``lru`` — vLLM-style automatic prefix caching: freed KV stays as an evictable entry, LRU under pressure;
  request-level FCFS (a returning turn queues by its return time).
* ``continuum`` — :class:`~plaintext_ref.reuse.continuum.ToolTTL` pins with τ*, program-level FCFS.
* ``pin_forever`` — TTL = ∞ (still unpinned under pressure), program-level FCFS.
* ``continuum_ttl_only`` — Continuum's TTL with request-level FCFS (ablation).
Output: per-program job completion time (JCT = finish − first arrival) and engine counters.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from plaintext_ref.reuse.continuum import ToolTTL

# Tool-duration distributions (seconds): (kind, parameters). "bimodal" = mixture of two exponentials.
TOOLS: dict[str, tuple] = {
    "read_file": ("exp", 0.5),                      # mean 0.5 s
    "web_search": ("lognormal", math.log(3.0), 0.5),  # median 3 s
    "run_tests": ("bimodal", 0.6, 1.0, 40.0),       # 60% fast (mean 1 s), 40% slow (mean 40 s)
}
POLICIES = ("no_pin", "lru", "continuum", "pin_forever", "continuum_ttl_only")


def draw_duration(rng: random.Random, tool: str) -> float:
    kind, *p = TOOLS[tool]
    if kind == "exp":
        return rng.expovariate(1.0 / p[0])
    if kind == "lognormal":
        return rng.lognormvariate(p[0], p[1])
    if kind == "bimodal":
        return rng.expovariate(1.0 / (p[1] if rng.random() < p[0] else p[2]))
    raise ValueError(f"unknown duration kind {kind!r}")


@dataclass(frozen=True)
class SimConfig:
    """Workload and engine parameters (defaults: a Llama-3.1-8B-class model on one GPU, order of magnitude)."""

    n_programs: int = 60
    arrival_rate: float = 0.5            # programs per second
    turns: tuple[int, int] = (3, 8)
    first_prompt: tuple[int, int] = (2000, 6000)
    append: tuple[int, int] = (200, 1500)
    output: tuple[int, int] = (50, 300)
    tool_mix: tuple[str, ...] = tuple(TOOLS)
    memory_tokens: int = 200_000
    max_batch: int = 64
    t_base: float = 0.01                 # s per iteration
    t_prefill: float = 5e-5              # s per prefilled token (20k tokens/s)
    t_decode: float = 3e-4               # s per running sequence per iteration

    def __post_init__(self) -> None:
        if self.n_programs < 1 or self.arrival_rate <= 0 or self.memory_tokens < 1 or self.max_batch < 1:
            raise ValueError(f"SimConfig: n_programs, arrival_rate, memory_tokens, max_batch must be positive: {self}")
        unknown = set(self.tool_mix) - set(TOOLS)
        if unknown:
            raise ValueError(f"SimConfig.tool_mix: unknown tools {sorted(unknown)}; known {sorted(TOOLS)}")


@dataclass(frozen=True)
class Turn:
    new_tokens: int      # tokens appended before this turn (the whole prompt for turn 0)
    output: int
    tool: str | None     # tool called after this turn (None on the last)
    tool_s: float


@dataclass(frozen=True)
class Program:
    pid: int
    arrival: float
    turns: tuple[Turn, ...]


def make_workload(cfg: SimConfig, seed: int) -> list[Program]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for pid in range(cfg.n_programs):
        t += rng.expovariate(cfg.arrival_rate)
        n = rng.randint(*cfg.turns)
        turns = []
        for i in range(n):
            new = rng.randint(*cfg.first_prompt) if i == 0 else rng.randint(*cfg.append)
            tool = rng.choice(cfg.tool_mix) if i < n - 1 else None
            turns.append(Turn(new, rng.randint(*cfg.output), tool, draw_duration(rng, tool) if tool else 0.0))
        out.append(Program(pid, t, tuple(turns)))
    return out


@dataclass
class _Req:
    pid: int
    turn: int
    ready: float          # when it entered the queue
    priority: float       # program arrival (program FCFS) or ready time (request FCFS)
    context: int          # prompt tokens of this turn
    output: int
    left: int = 0
    reserved: int = 0


@dataclass
class _Entry:
    tokens: int
    last_used: float
    pinned_until: float = -math.inf


@dataclass
class SimResult:
    policy: str
    seed: int
    jct: dict[int, float]
    prefill_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0
    unpins: int = 0
    max_memory: int = 0
    makespan: float = 0.0
    ttls: list[float] = field(default_factory=list)

    @property
    def mean_jct(self) -> float:
        return sum(self.jct.values()) / len(self.jct)

    def quantile(self, q: float) -> float:
        xs = sorted(self.jct.values())
        return xs[min(len(xs) - 1, int(q * len(xs)))]


def simulate(cfg: SimConfig, policy: str, seed: int, ttl_rule: ToolTTL | None = None,
             fixed_ttl: float | None = None) -> SimResult:
    """Run every program of ``make_workload(cfg, seed)`` to completion under ``policy``.

    fixed_ttl: for the pinning policies, replace τ* by this constant (0 = evict-on-finish into the LRU; tests).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
    programs = make_workload(cfg, seed)
    rule = ttl_rule if ttl_rule is not None else ToolTTL()
    program_fcfs = policy in ("continuum", "pin_forever")
    pins = policy in ("continuum", "pin_forever", "continuum_ttl_only")
    res = SimResult(policy, seed, {})
    events: list[tuple[float, int, int]] = [(p.arrival, p.pid, 0) for p in programs]   # (time, pid, turn)
    events.sort()
    ctx = {p.pid: 0 for p in programs}          # tokens of each program's context so far
    entries: dict[int, _Entry] = {}
    waiting: list[_Req] = []
    running: list[_Req] = []
    now = 0.0

    def used() -> int:
        return sum(r.reserved for r in running) + sum(e.tokens for e in entries.values())

    def make_room(need: int, own: int) -> bool:
        """Free ``need`` tokens: evict unpinned entries LRU-first, then unpin latest-expiry first."""
        while cfg.memory_tokens - used() < need:
            free = [(e.last_used, pid) for pid, e in entries.items() if pid != own and e.pinned_until <= now]
            if free:
                del entries[min(free)[1]]
                res.evictions += 1
                continue
            pinned = [(-e.pinned_until, pid) for pid, e in entries.items() if pid != own]
            if not pinned:
                return False
            entries[min(pinned)[1]].pinned_until = -math.inf
            res.unpins += 1
        return True

    while events or waiting or running:
        while events and events[0][0] <= now:
            t, pid, turn = events.pop(0)
            prog = programs[pid]
            ctx[pid] += prog.turns[turn].new_tokens
            if turn > 0:
                rule.observe(prog.turns[turn - 1].tool, prog.turns[turn - 1].tool_s)
            waiting.append(_Req(pid, turn, t, prog.arrival if program_fcfs else t, ctx[pid], prog.turns[turn].output))
        waiting.sort(key=lambda r: (r.priority, r.pid))
        admitted_tokens = 0
        while waiting and len(running) < cfg.max_batch:
            req = waiting[0]
            entry = entries.get(req.pid)
            cached = entry.tokens if entry else 0
            need = req.context + req.output - cached
            if not make_room(need, req.pid):
                break
            entries.pop(req.pid, None)
            waiting.pop(0)
            req.left, req.reserved = req.output, req.context + req.output
            admitted_tokens += req.context - cached
            res.hit_tokens += cached
            running.append(req)
        if not running:
            if not events:
                raise RuntimeError(f"deadlock at t={now:.2f}: a request needs more than memory_tokens")
            now = events[0][0]
            continue
        res.prefill_tokens += admitted_tokens
        res.max_memory = max(res.max_memory, used())
        now += cfg.t_base + cfg.t_prefill * admitted_tokens + cfg.t_decode * len(running)
        for req in list(running):
            req.left -= 1
            if req.left > 0:
                continue
            running.remove(req)
            prog = programs[req.pid]
            ctx[req.pid] = req.context + req.output
            turn = prog.turns[req.turn]
            if turn.tool is None:
                res.jct[req.pid] = now - prog.arrival
                continue
            events.append((now + turn.tool_s, req.pid, req.turn + 1))
            if policy == "no_pin":
                continue
            entry = _Entry(ctx[req.pid], now)
            if pins:
                queue_s = cfg.t_prefill * sum(r.context for r in waiting)
                tau = fixed_ttl if fixed_ttl is not None else (
                    math.inf if policy == "pin_forever" else
                    rule.ttl(turn.tool, cfg.t_prefill * ctx[req.pid] + queue_s, ctx[req.pid] / cfg.memory_tokens))
                entry.pinned_until = now + tau
                res.ttls.append(tau)
            entries[req.pid] = entry
        events.sort()
    res.makespan = now
    return res
