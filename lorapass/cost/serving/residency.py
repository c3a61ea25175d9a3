"""Where adapters live: GPU slots (``max_loras``) and a host cache (``max_cpu_loras``), both LRU.

A request whose adapter has no GPU slot is a miss: a free slot is taken (evicting the least recently used
adapter no running request uses; none free means the request waits), the adapter is read from storage first if
the host cache misses it (size / storage bandwidth, evicting the host's LRU adapter), then copied host->device
(:meth:`~lorapass.cost.hw.Host.load_time`). Without ``max_loras`` an adapter, once copied, stays (in S-LoRA's
unified pool it would only cost memory while a running request uses it, which is what the KV budget charges).
The GPU starts empty; the host cache starts holding every adapter
when it is unbounded (S-LoRA keeps all adapters in host memory) and empty otherwise. With overlap the copies run one after another on a copy stream
while the GPU keeps decoding and the request becomes admissible when its copy lands; without overlap the copy
stalls the iteration that needs it.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from lorapass.cost.hw import Host


class Residency:
    def __init__(self, sizes: np.ndarray, tensors: np.ndarray, host: Host, *, slots: int | None,
                 host_slots: int | None, storage_bw: float, overlap: bool) -> None:
        self.sizes, self.tensors, self.host = sizes, tensors, host
        self.slots = slots if slots is not None else len(sizes)
        self.host_slots = host_slots if host_slots is not None else len(sizes)
        self.storage_bw, self.overlap = storage_bw, overlap
        self.gpu: OrderedDict[int, None] = OrderedDict()
        # every adapter starts on the host when the cache is unbounded (S-LoRA); a bounded cache starts cold
        self.cached: OrderedDict[int, None] = OrderedDict((a, None) for a in range(len(sizes)) if host_slots is None)
        self.loading: dict[int, float] = {}  # adapter -> time its copy lands
        self.copy_free = 0.0
        self.loads = self.host_misses = 0
        self.load_seconds = 0.0
        self.peak_host_bytes = float(sizes[list(self.cached)].sum()) if self.cached else 0.0

    def ready(self, adapter: int, now: float) -> bool:
        """Whether the adapter is on the GPU at ``now`` (finishing copies are moved in)."""
        landed = self.loading.get(adapter)
        if landed is not None and landed <= now:
            del self.loading[adapter]
            self.gpu[adapter] = None
        return adapter in self.gpu

    def next_landing(self) -> float:
        return min(self.loading.values(), default=np.inf)

    def touch(self, adapter: int) -> None:
        self.gpu.move_to_end(adapter)

    def request(self, adapter: int, now: float, pinned: np.ndarray, taken: set[int] = frozenset()) -> float | None:
        """Start bringing ``adapter`` to the GPU; the seconds the copy takes (None: every slot is in use).

        ``pinned`` counts running requests per adapter; ``taken`` are adapters this admission already chose.
        With overlap the copy is queued on the copy stream and lands at ``self.loading[adapter]``.
        """
        if adapter in self.gpu:
            self.touch(adapter)
            return 0.0
        if adapter in self.loading:
            return 0.0
        if len(self.gpu) + len(self.loading) >= self.slots:
            victim = next((a for a in self.gpu if pinned[a] == 0 and a not in taken), None)
            if victim is None:
                return None
            del self.gpu[victim]
        self.loads += 1
        seconds = self.host.load_time(float(self.sizes[adapter]), int(self.tensors[adapter]))
        if adapter in self.cached:
            self.cached.move_to_end(adapter)
        else:
            self.host_misses += 1
            seconds += self.sizes[adapter] / self.storage_bw
            if len(self.cached) >= self.host_slots:
                self.cached.popitem(last=False)
            self.cached[adapter] = None
            self.peak_host_bytes = max(self.peak_host_bytes, float(self.sizes[list(self.cached)].sum()))
        self.load_seconds += seconds
        if self.overlap:
            start = max(now, self.copy_free)
            self.copy_free = self.loading[adapter] = start + seconds
        else:
            self.gpu[adapter] = None
        return float(seconds)
