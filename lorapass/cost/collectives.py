"""Collective communication times from ring and tree formulas (alpha-beta model).

With N devices, per-message latency ``a`` (s) and per-direction bandwidth ``b`` (bytes/s) of the slowest link
the group spans, and ``S`` the full buffer in bytes (the all-reduced tensor, the gathered result, the
scattered input, or one device's all-to-all send buffer):

- ring all-reduce:        2(N-1)·a + 2(N-1)/N · S/b
- ring all-gather:         (N-1)·a +  (N-1)/N · S/b      (reduce-scatter the same)
- all-to-all:              (N-1)·a +  (N-1)/N · S/b
- tree all-reduce:   2·ceil(log2 N)·a + 2·S/b            (pipelined reduce up a binary tree, broadcast down)
- point-to-point:                 a + S/b

``algorithm="auto"`` takes the faster of ring and tree for all-reduce (as NCCL's tuner does); the other
collectives only have the ring form. N = 1 costs nothing. ``nbytes`` may be a numpy array (one time each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lorapass.cost.hw import HardwareSpec, Link

Kind = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p"]
Algorithm = Literal["ring", "tree", "auto"]


def ring_all_reduce(n: int, nbytes: float, link: Link) -> float:
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * link.latency + 2 * (n - 1) / n * nbytes / link.bandwidth


def tree_all_reduce(n: int, nbytes: float, link: Link) -> float:
    if n <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * link.latency + 2 * nbytes / link.bandwidth


def ring_all_gather(n: int, nbytes: float, link: Link) -> float:
    if n <= 1:
        return 0.0
    return (n - 1) * link.latency + (n - 1) / n * nbytes / link.bandwidth


ring_reduce_scatter = ring_all_gather


def all_to_all(n: int, nbytes: float, link: Link) -> float:
    if n <= 1:
        return 0.0
    return (n - 1) * link.latency + (n - 1) / n * nbytes / link.bandwidth


def p2p(nbytes: float, link: Link) -> float:
    return link.latency + nbytes / link.bandwidth


def collective_time(kind: Kind, n: int, nbytes: float, link: Link, algorithm: Algorithm = "auto") -> float:
    """Seconds for one collective of ``kind`` over ``n`` devices moving a buffer of ``nbytes``."""
    if kind == "all_reduce":
        if algorithm == "ring":
            return ring_all_reduce(n, nbytes, link)
        if algorithm == "tree":
            return tree_all_reduce(n, nbytes, link)
        return np.minimum(ring_all_reduce(n, nbytes, link), tree_all_reduce(n, nbytes, link))
    if kind in ("all_gather", "reduce_scatter"):
        return ring_all_gather(n, nbytes, link)
    if kind == "all_to_all":
        return all_to_all(n, nbytes, link)
    if kind == "p2p":
        return p2p(nbytes, link) if n > 1 else 0.0
    raise ValueError(f"unknown collective {kind!r}")


@dataclass(frozen=True)
class Placement:
    """Where a group's ranks sit: ``size`` ranks ``stride`` apart (TP innermost, then EP, PP, DP)."""

    size: int
    stride: int = 1

    def link(self, spec: HardwareSpec) -> Link:
        """The intra-node link when the whole group fits in one node, else the inter-node link (the bottleneck)."""
        ic = spec.interconnect
        span = (self.size - 1) * self.stride + 1
        return ic.intra_node if span <= ic.devices_per_node else ic.inter_node


def p2p_link(spec: HardwareSpec, first_rank: int, second_rank: int) -> Link:
    """The link between two ranks: intra-node when they share a node."""
    per_node = spec.interconnect.devices_per_node
    same = first_rank // per_node == second_rank // per_node
    return spec.interconnect.intra_node if same else spec.interconnect.inter_node
