"""Every rank checks, before any work, that all ranks were given the same public options.

Ranks of one job can be started with different command lines (MPMD ``mpirun -n 1 A : -n 1 B``, two
hosts, a stale checkout on one of them); a rank that decodes 6 tokens while its peer decodes 3
falls out of step and waits on a collective until the op timeout. So after the MPI rendezvous each
rank sends its public options (a flat JSON-able dict: policy, budgets, token count, precision, a
digest of the code) to rank 0, which names every key that differs. Only public values travel: the
prompt, the tokenizer and the weights path are never part of them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

from launch.errors import LaunchError, describe_rank

_PACKAGES = ("launch", "protocols", "mpcache", "plaintext_ref")


def flatten(options: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """``{"kv": {"budget": 0.1}}`` -> ``{"kv.budget": 0.1}``."""
    flat: dict[str, object] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def code_digest(root: Path = Path(__file__).resolve().parents[1]) -> str:
    """sha256 (12 hex) over the source of the project's packages: ranks must run the same protocol."""
    h = hashlib.sha256()
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def options_digest(options: Mapping[str, object]) -> str:
    """sha256 (12 hex) of the canonical JSON of ``options`` (shown in the banner)."""
    return hashlib.sha256(json.dumps(flatten(options), sort_keys=True).encode()).hexdigest()[:12]


def differences(mine: Mapping[str, object], theirs: Mapping[str, object]) -> list[str]:
    """``["max_new_tokens 6 vs 3", ...]`` for every key whose value differs or is missing."""
    a, b = flatten(mine), flatten(theirs)
    return [f"{k} {a.get(k, '(unset)')} vs {b.get(k, '(unset)')}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class InputRejected(LaunchError):
    """Some rank rejected its own input (it printed why itself); every rank stops, exit code 2."""


def agree(options: Mapping[str, object], n_parties: int = 2, rejected: bool = False) -> None:
    """Collective over ``MPI.COMM_WORLD``: raise the same ``LaunchError`` on every rank if any rank's
    ``options`` differ from rank 0's, ``InputRejected`` if any rank ``rejected`` its own input (call
    under a deadline: it waits for every rank).

    A rank whose input is bad still comes here rather than exiting before ``MPI_Init``: Open MPI
    5.0.11's prterun can crash (SIGSEGV, "PMIX_ERR_UNREACH") when one rank exits while the others
    are still connecting. Only the flag travels, never the rejected input or the reason.
    """
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    gathered = world.gather((dict(options), rejected), root=0)
    error, who = None, []
    if world.Get_rank() == 0:
        who = [describe_rank(r, n_parties) for r, (_, bad) in enumerate(gathered) if bad]
        problems = [f"{describe_rank(r, n_parties)}: {'; '.join(d)}"
                    for r, (theirs, _) in enumerate(gathered) if (d := differences(options, theirs))]
        if problems:
            error = ("the ranks were given different public options (rank 0's value vs theirs) — "
                     + " | ".join(problems))
    error, who = world.bcast((error, who), root=0)
    if who:
        raise InputRejected(f"stopped before any work: {', '.join(who)} rejected its input")
    if error:
        raise LaunchError(error)
