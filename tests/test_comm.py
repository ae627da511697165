"""The network cost model of the K-worker engine (trainers/comm.py)."""
import math

import pytest

from trainers import comm
from trainers.config import NetworkConfig


def test_presets_and_overrides():
    ten = comm.network(NetworkConfig(preset="10gbe"))
    assert ten.bandwidth_bytes_per_s == pytest.approx(10e9 / 8)
    assert ten.latency_s == pytest.approx(comm.PRESETS["10gbe"][0] * 1e-6)
    ib = comm.network(NetworkConfig(preset="100gib"))
    assert ib.bandwidth_bytes_per_s == pytest.approx(100e9 / 8)
    assert ib.latency_s < ten.latency_s
    nvl = comm.network(NetworkConfig(preset="nvlink"))
    assert nvl.bandwidth_bytes_per_s > ib.bandwidth_bytes_per_s
    # an override replaces one figure of the preset and keeps the other
    fast = comm.network(NetworkConfig(preset="10gbe", bandwidth_gbps=40.0))
    assert fast.bandwidth_bytes_per_s == pytest.approx(40e9 / 8) and fast.latency_s == ten.latency_s
    slow = comm.network(NetworkConfig(preset="10gbe", latency_us=100.0))
    assert slow.latency_s == pytest.approx(100e-6) and slow.bandwidth_bytes_per_s == ten.bandwidth_bytes_per_s
    custom = comm.network(NetworkConfig(preset="custom", latency_us=3.0, bandwidth_gbps=8.0))
    assert custom.latency_s == pytest.approx(3e-6) and custom.bandwidth_bytes_per_s == pytest.approx(1e9)
    with pytest.raises(ValueError):
        comm.network(NetworkConfig(preset="custom"))


def test_allreduce_and_gossip_bytes():
    assert comm.allreduce_bytes(1000, 1) == 0  # nobody to talk to
    assert comm.allreduce_bytes(1000, 2) == pytest.approx(1000)  # 2 * 1/2
    assert comm.allreduce_bytes(1000, 4) == pytest.approx(1500)  # 2 * 3/4
    assert comm.allreduce_bytes(1000, 1000) == pytest.approx(1998)  # tends to twice the payload
    assert comm.gossip_bytes(1000, 2) == 2000
    assert comm.gossip_bytes(1000, 0) == 0


def test_modeled_time_is_latency_plus_bandwidth_per_round():
    net = comm.Network(latency_s=1e-5, bandwidth_bytes_per_s=1e9)
    assert comm.round_time(1e6, net) == pytest.approx(1e-5 + 1e-3)
    # rounds of different sizes add up to the total formula
    sizes = [1e6, 2e6, 5e5]
    assert comm.modeled_time(len(sizes), sum(sizes), net) == pytest.approx(sum(comm.round_time(s, net) for s in sizes))
    assert comm.modeled_time(0, 0, net) == 0
    # the slower network costs more for the same traffic, and latency dominates tiny messages
    ten, ib = comm.network(NetworkConfig(preset="10gbe")), comm.network(NetworkConfig(preset="100gib"))
    assert comm.modeled_time(100, 4e8, ten) > comm.modeled_time(100, 4e8, ib)
    assert math.isclose(comm.modeled_time(1000, 0, ten), 1000 * ten.latency_s)
