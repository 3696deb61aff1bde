"""Launch pieces that need no processes: config, flags, rendezvous, devices, roles, errors, banner."""
from __future__ import annotations

import argparse
import re

import pytest
import torch

from launch.banner import TFP_MODE, TTP_MODE, PublicInfo, banner, security_mode
from launch.config import LaunchConfig, add_arguments, from_args
from launch.devices import party_device
from launch.errors import ExitCode, LaunchError, NotUnderMPI, PeerLost, PeerTimeout
from launch.mpi import Topology, discover, usage
from launch.rendezvous import advertised_addr, free_port, rendezvous_url
from launch.session import gloo_cause, peer_error

GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
              "[127.0.0.1]:10887: Connection reset by peer. This is typically caused by a remote "
              "worker hanging or bugs in the application.")


@pytest.mark.parametrize("field, value", [
    ("master_addr", ""), ("advertise_addr", "0.0.0.0"), ("port", -1), ("port", 70000),
    ("timeout_s", 0), ("op_timeout_s", -1.0), ("device", "tpu"), ("ifname", "")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        LaunchConfig(**{field: value})


def test_flags_map_one_to_one_onto_fields():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_args(parser.parse_args([])) == LaunchConfig()
    cfg = from_args(parser.parse_args(
        ["--master-addr", "0.0.0.0", "--advertise-addr", "h0", "--port", "29512", "--timeout-s",
         "5", "--op-timeout-s", "7", "--dealer", "--device", "cuda", "--ifname", "eth0"]))
    assert cfg == LaunchConfig("0.0.0.0", "h0", 29512, 5.0, 7.0, True, "cuda", "eth0")
    assert from_args(parser.parse_args(["--no-dealer"])).dealer is False


def test_rendezvous_url():
    url = rendezvous_url(LaunchConfig())
    host, port = re.fullmatch(r"tcp://(127\.0\.0\.1):(\d+)", url).groups()
    assert 0 < int(port) < 65536
    assert rendezvous_url(LaunchConfig(port=29600)) == "tcp://127.0.0.1:29600"
    assert rendezvous_url(LaunchConfig("0.0.0.0", "10.0.0.5", 29600)) == "tcp://10.0.0.5:29600"
    assert advertised_addr(LaunchConfig("0.0.0.0")) not in ("0.0.0.0", "")
    assert free_port() != 0


@pytest.mark.parametrize("count, expected", [
    (1, ["cuda:0", "cuda:0", "cpu"]),      # one GPU: both parties share it, dealer on the CPU
    (2, ["cuda:0", "cuda:1", "cpu"]),
    (3, ["cuda:0", "cuda:1", "cuda:2"]),   # a third GPU for the dealer
    (8, ["cuda:0", "cuda:1", "cuda:2"])])
def test_party_device_placement(count, expected):
    got = [str(party_device(rank, "cuda", device_count=count)) for rank in range(3)]
    assert got == expected


def test_party_device_cpu_and_errors():
    assert party_device(1, "cpu", device_count=4) == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        party_device(0, "cuda", device_count=0)
    with pytest.raises(ValueError, match="device"):
        party_device(0, "tpu")


def test_topology_roles_and_env():
    client, owner, dealer = (Topology(r, 3, "tcp://h:1") for r in range(3))
    assert (client.name, owner.name, dealer.name) == (
        "party 0 (client)", "party 1 (model owner)", "dealer (rank 2)")
    assert dealer.is_dealer and not owner.is_dealer and client.provider == "TTP"
    assert Topology(0, 2, "tcp://h:1").provider == "TFP"
    assert dealer.env() == {"RANK": "2", "WORLD_SIZE": "2", "RENDEZVOUS": "tcp://h:1",
                            "DISTRIBUTED_BACKEND": "gloo"}  # CrypTen's world = computing parties


@pytest.mark.parametrize("size", [1, 4])
def test_topology_refuses_other_world_sizes(size):
    with pytest.raises(LaunchError, match=f"mpirun -n {size}: MPCache runs -n 2"):
        Topology(0, size, "tcp://h:1")


def test_discover_outside_mpirun(monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(NotUnderMPI) as info:
        discover(LaunchConfig(), prog="python -m mpcache.launch")
    assert str(info.value) == usage("python -m mpcache.launch")
    assert "mpirun -n 2 python -m mpcache.launch" in str(info.value)
    assert info.value.code == ExitCode.USAGE


def test_peer_error_names_the_peer():
    lost = peer_error(RuntimeError(GLOO_RESET), rank=0)
    assert isinstance(lost, PeerLost) and lost.code == ExitCode.PEER_LOST
    assert str(lost) == ("party 1 (model owner) died or disconnected "
                         "(gloo: Read error [127.0.0.1]:10887: Connection reset by peer)")
    with_dealer = peer_error(RuntimeError("Connection closed by peer [::1]:9"), rank=1, dealer=True)
    assert str(with_dealer).startswith("party 0 (client) died")  # not inside a dealer request

    def ttp_request() -> None:  # the name of CrypTen's TTPClient method that talks to the dealer
        raise RuntimeError("Connection closed by peer [::1]:9")
    try:
        ttp_request()
    except RuntimeError as err:
        dealer_lost = peer_error(err, rank=0, dealer=True)
    assert str(dealer_lost).startswith("dealer (rank 2) died or disconnected")
    on_dealer = peer_error(RuntimeError("Broken pipe"), rank=2, dealer=True)
    assert str(on_dealer).startswith("party 0 (client) or party 1 (model owner) died")
    silent = peer_error(RuntimeError("Application timeout caused pair closure"), rank=1)
    assert isinstance(silent, PeerTimeout) and silent.code == ExitCode.PEER_TIMEOUT
    assert peer_error(ValueError("shape mismatch"), rank=0) is None
    assert gloo_cause(RuntimeError("")) == "RuntimeError"


def test_banner_states_mode_model_and_public_quantities():
    public = PublicInfo("llama L=30 E=576 H=9 Hkv=3 D=64 F=1536 V=49152", prompt_tokens=12,
                        new_tokens=8, precision_bits=16, budgets={"static_keep": 0.3, "k1": 4})
    tfp = banner("SmolLM2-135M-Instruct", dealer=False, public=public)
    for text in (TFP_MODE, "SmolLM2-135M-Instruct", "L=30 E=576", "prompt length 12 tokens",
                 "8 generated tokens", "static_keep=0.3, k1=4", "16 fractional bits"):
        assert text in tfp
    assert "NOT SECURE against party 0" in security_mode(False)
    ttp = banner("tiny-llama", dealer=True, public=public)
    assert TTP_MODE in ttp and "separate dealer rank 2" in ttp and "NOT SECURE" not in ttp


@pytest.mark.parametrize("kwargs", [dict(architecture=""), dict(prompt_tokens=0),
                                    dict(new_tokens=-1), dict(precision_bits=0)])
def test_public_info_validation(kwargs):
    base = dict(architecture="gpt2", prompt_tokens=4, new_tokens=1, precision_bits=16)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PublicInfo(**{**base, **kwargs})
