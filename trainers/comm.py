"""Communication cost model of the K-worker engine: bytes each worker sends, and modeled network time.

Pure functions, no torch. A communication *round* is one averaging (all-reduce) or one gossip exchange.
The model is the usual latency-bandwidth (alpha-beta) one the DESIGN asks for:

    comm_time_modeled = rounds * latency + bytes_sent_per_worker / bandwidth

that is, per round `latency + bytes / bandwidth`. It ignores contention and the 2(K-1) latency hops of a
ring all-reduce on purpose: a study compares algorithms under one network, not absolute seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import NetworkConfig

# name: (latency in microseconds, bandwidth in Gbit/s per worker link, one direction). Orders of
# magnitude of commodity hardware, not measurements of any one cluster:
PRESETS: dict[str, tuple[float, float]] = {
    # 10 Gbit/s Ethernet through the kernel TCP stack: MPI/NCCL small-message latency is tens of
    # microseconds. The fifth source (ADPSGD, section IV-E) emulates this "cloud" setting by throttling
    # its nodes to 10 Gbit/s.
    "10gbe": (30.0, 10.0),
    # 100 Gbit/s EDR InfiniBand with RDMA: about 1-2 us MPI ping-pong latency (Mellanox ConnectX-5 data
    # sheets quote sub-microsecond adapter latency); the fifth source's HPC cluster.
    "100gib": (2.0, 100.0),
    # NVLink 3 (A100 SXM): 12 links x 25 GB/s per direction = 300 GB/s = 2400 Gbit/s between GPUs of one
    # node; the latency is that of a NCCL kernel launch and handshake, a few microseconds.
    "nvlink": (5.0, 2400.0),
}


@dataclass(frozen=True)
class Network:
    latency_s: float  # per round
    bandwidth_bytes_per_s: float  # per worker, one direction


def network(cfg: NetworkConfig) -> Network:
    """The preset of `cfg`, with `latency_us` / `bandwidth_gbps` overriding its figures."""
    if cfg.preset == "custom":
        if cfg.latency_us is None or cfg.bandwidth_gbps is None:
            raise ValueError("network preset custom needs latency_us and bandwidth_gbps")
        latency_us, gbps = cfg.latency_us, cfg.bandwidth_gbps
    elif cfg.preset in PRESETS:
        latency_us, gbps = PRESETS[cfg.preset]
        latency_us = latency_us if cfg.latency_us is None else cfg.latency_us
        gbps = gbps if cfg.bandwidth_gbps is None else cfg.bandwidth_gbps
    else:
        raise ValueError(f"unknown network preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}, custom")
    return Network(latency_s=latency_us * 1e-6, bandwidth_bytes_per_s=gbps * 1e9 / 8)


def allreduce_bytes(payload_bytes: float, workers: int) -> float:
    """Bytes each worker sends in a bandwidth-optimal ring all-reduce of `payload_bytes`: a reduce-scatter
    and an all-gather, each (K-1) chunks of payload/K (Patarasuk & Yuan 2009). One worker sends nothing."""
    return 2.0 * (workers - 1) / workers * payload_bytes


def gossip_bytes(payload_bytes: float, neighbours: int) -> float:
    """Bytes each worker sends in one gossip step: its whole model to every neighbour."""
    return float(payload_bytes) * neighbours


def round_time(bytes_sent: float, net: Network) -> float:
    """Modeled seconds of one round in which each worker sends `bytes_sent`."""
    return net.latency_s + bytes_sent / net.bandwidth_bytes_per_s


def modeled_time(rounds: float, bytes_sent: float, net: Network) -> float:
    """Modeled seconds of `rounds` rounds sending `bytes_sent` in total (per worker): the sum of the rounds'
    `round_time`, since the model is linear in bytes."""
    return rounds * net.latency_s + bytes_sent / net.bandwidth_bytes_per_s
