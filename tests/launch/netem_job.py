"""Party function of ``test_netem`` (a module of its own: parties import it inside a namespace)."""
from __future__ import annotations


def forward_job() -> dict:
    """Share tiny-llama, then one 1-token forward unshaped and one at RTT 20 ms (phases' costs)."""
    import torch

    from launch.netrun import use_profile
    from mpcache.generate import share_tokens
    from mpcache.model import ModelArgs
    from mpcache.session import PrivateSession
    from plaintext_ref.models import load_model
    from protocols.compat import comm

    rank = comm.get().get_rank()
    hf, _, config = load_model("tiny-llama")
    args = ModelArgs.from_hf(config)
    session = PrivateSession(hf.state_dict() if rank == 1 else None, args)
    for profile in ("loopback", "rtt20"):
        use_profile(profile)
        x = share_tokens([7] if rank == 0 else None, 1, args.vocab_size)
        with session.meter.phase(profile):
            session.model.forward(x, torch.tensor([0]), session.sequence())
    report = session.costs()
    return {p: {"wall_s": report.row(p).wall_s, "rounds": report.row(p).rounds} for p in ("loopback", "rtt20")}


def dealer_mul_job(seed: int) -> float:
    """A secret product with Beaver triples from the separate dealer; -> max abs error."""
    import torch

    from protocols.compat import crypten
    torch.manual_seed(seed)
    x, w = torch.randn(3, 8), torch.randn(8, 5)
    out = crypten.cryptensor(x, src=0).matmul(crypten.cryptensor(w, src=1)).get_plain_text()
    return (out - x @ w).abs().max().item()
