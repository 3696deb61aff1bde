"""Content-addressed store of precomputed KV caches (per chunk, segment or request), shared by the reuse methods.

An entry is a :class:`~plaintext_ref.reuse.runner.SeqKV` (pre-RoPE keys, so a hit can be re-positioned anywhere)
plus metadata (its token ids, the context it was computed after). Its key is
``sha256(model fingerprint ‖ kind ‖ context ids ‖ token ids)``: the same tokens computed after a different context
(CacheBlend's chunk after the system prefix vs Graph-KV's chunk from position 0) are different entries, and a cache
from another model never matches.

Tiers: an in-memory LRU bounded by ``capacity_bytes`` (None = unbounded) and, when ``disk_dir`` is given, a disk tier
(one ``torch.save`` file per key) that memory evictions spill to and misses fall back on; a disk hit is promoted to
memory. ``pin(key, until)`` protects an entry from memory eviction until simulated time ``until`` (the hook
Continuum's TTL rule uses; kv_methods.md §10: ``on_turn_end → ttl``, ``on_memory_pressure → victims``).
Counters (hits, disk_hits, misses, evictions) make reuse rates reportable.
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from plaintext_ref.reuse.runner import SeqKV

log = logging.getLogger(__name__)


def model_fingerprint(model: nn.Module) -> str:
    """Short digest of a model's config and a few of its weights (a cache is only valid for its model)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for _, p in list(model.named_parameters())[:3]:
        h.update(p.detach().float().flatten()[:256].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def content_key(model_key: str, kind: str, context: list[int] | tuple[int, ...], ids: list[int] | tuple[int, ...]
                ) -> str:
    """sha256 over model ‖ kind ‖ context ids ‖ ids (hex)."""
    h = hashlib.sha256(f"{model_key}|{kind}|".encode())
    h.update(",".join(map(str, context)).encode() + b"|" + ",".join(map(str, ids)).encode())
    return h.hexdigest()


@dataclass
class Entry:
    kv: SeqKV
    meta: dict = field(default_factory=dict)   # "ids": list[int], "context": list[int], anything the method adds
    pinned_until: float = float("-inf")


@dataclass
class StoreStats:
    hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    evictions: int = 0

    def as_dict(self) -> dict:
        return dict(hits=self.hits, disk_hits=self.disk_hits, misses=self.misses, evictions=self.evictions)


class KVStore:
    """In-memory LRU of :class:`Entry` with an optional disk tier.

    Parameters
    ----------
    capacity_bytes : int | None, bound on the K/V bytes held in memory (None = unbounded).
    disk_dir : str | Path | None, folder of the disk tier (created); None = memory only.
    """

    def __init__(self, capacity_bytes: int | None = None, disk_dir: str | Path | None = None) -> None:
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0 or None, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.disk_dir = None if disk_dir is None else Path(disk_dir)
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
        self._mem: OrderedDict[str, Entry] = OrderedDict()
        self.stats = StoreStats()
        self.now = 0.0   # simulated clock for pins (Continuum); the reuse methods never advance it

    # ---------------------------------------------------------------- reads and writes

    def __contains__(self, key: str) -> bool:
        return key in self._mem or (self.disk_dir is not None and self._path(key).is_file())

    def __len__(self) -> int:
        return len(self._mem)

    @property
    def memory_bytes(self) -> int:
        return sum(e.kv.nbytes for e in self._mem.values())

    def get(self, key: str) -> Entry | None:
        """The entry (marked most recently used), from memory, else from disk (promoted), else None."""
        if key in self._mem:
            self._mem.move_to_end(key)
            self.stats.hits += 1
            return self._mem[key]
        if self.disk_dir is not None and self._path(key).is_file():
            saved = torch.load(self._path(key), weights_only=False)
            entry = Entry(SeqKV(saved["k"], saved["v"], saved["pos"]), saved["meta"])
            self.stats.disk_hits += 1
            self._insert(key, entry)
            return entry
        self.stats.misses += 1
        return None

    def put(self, key: str, kv: SeqKV, meta: dict | None = None) -> Entry:
        entry = Entry(kv, dict(meta or {}))
        self._insert(key, entry)
        return entry

    def get_or_compute(self, key: str, compute: Callable[[], SeqKV], meta: dict | None = None) -> SeqKV:
        entry = self.get(key)
        return entry.kv if entry is not None else self.put(key, compute(), meta).kv

    def items(self) -> Iterator[tuple[str, Entry]]:
        """Memory entries, least recently used first (KVShare's candidate scan)."""
        return iter(list(self._mem.items()))

    # ---------------------------------------------------------------- pins and eviction

    def pin(self, key: str, until: float) -> None:
        """Protect ``key`` from memory eviction while ``self.now < until``."""
        self._mem[key].pinned_until = until

    def unpin(self, key: str) -> None:
        self._mem[key].pinned_until = float("-inf")

    def evict(self, key: str) -> None:
        """Drop ``key`` from memory (spilled to disk when there is a disk tier)."""
        entry = self._mem.pop(key)
        self.stats.evictions += 1
        if self.disk_dir is not None and not self._path(key).is_file():
            torch.save({"k": entry.kv.k, "v": entry.kv.v, "pos": entry.kv.pos, "meta": entry.meta}, self._path(key))

    def _insert(self, key: str, entry: Entry) -> None:
        self._mem[key] = entry
        self._mem.move_to_end(key)
        if self.capacity_bytes is None:
            return
        while self.memory_bytes > self.capacity_bytes:
            victim = next((k for k, e in self._mem.items() if k != key and e.pinned_until <= self.now), None)
            if victim is None:
                log.debug("store over capacity but every other entry is pinned")
                return
            self.evict(victim)

    def _path(self, key: str) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / f"{key}.pt"
