"""Continuous batching of one replica, iteration by iteration, under an adapter policy.

The engine (LightLLM / S-LoRA / vLLM without chunked prefill): an iteration is either a prefill of newly
admitted requests (it emits their first token) or a decode step of the running batch. Admission is tried when
the batch is empty or every ``admit_every`` decode steps, first come first served, under ``max_running``,
``max_batch_tokens`` prompt tokens per prefill, and a KV budget: the peak KV the running batch plus the new
requests will ever hold (output lengths known, the reservation rule of LightLLM / S-LoRA) must fit the pool
left after adapter memory. Policies:

- ``merge`` / switch ``drain`` (S-LoRA's merge baseline): one adapter merged at a time; only its requests are
  admitted, and none once more than ``max_other_waiting`` requests of other adapters wait ahead of the first
  of its own; when the batch drains, the adapter of the oldest waiting request is merged (unmerge + load +
  merge, a stall) and its requests admitted. Steps cost the base model.
- ``merge`` / switch ``threshold`` (dLoRA): at each admission point, if serving only the most requested
  adapter merged gives more requests per second than the mixed batch of everything in the system
  (share > t_merged / t_unmerged at the current batch), switch to it merged (other requests keep their KV and
  pause); otherwise run unmerged mixed batches. Each mode change costs its unmerge/merge.
- ``dynamic``: unmerged single-adapter runs (one adapter per run, as ONNX Runtime swaps adapters per run):
  each decode round runs every adapter's group once; prefills run per adapter.
- ``multi``: mixed batches through the bank (grouped or padded), at most ``max_loras`` distinct adapters
  resident, loads per :mod:`~lorapass.cost.serving.residency`.

Between events (arrival, finish, landing copy, admission point) the decode steps are costed in one vector:
contexts grow by one token per sequence per step, the LoRA term is constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lorapass.cost.hw import Host
from lorapass.cost.serving.adapters import AdapterSet
from lorapass.cost.serving.residency import Residency
from lorapass.cost.serving.step import StepModel
from lorapass.cost.serving.trace import Requests, expected_distinct
from lorapass.cost.serving.workload import MergeOptions, Server
from lorapass.errors import SpecError

POLICIES = ("merge", "dynamic", "multi")
_CHUNK = 2048  # decode steps costed in one vector at most


@dataclass
class Stats:
    """What the simulation counts besides per-request times."""

    decode_steps: float = 0.0  # iterations that decoded (a dynamic round counts one per adapter group)
    batch_sum: float = 0.0  # sequences decoded, summed over decode iterations
    rounds: float = 0.0  # decode rounds (every running sequence advanced once)
    running_sum: float = 0.0  # running sequences B, summed over rounds
    distinct_sum: float = 0.0  # distinct adapters among the running sequences, summed over rounds
    expected_sum: float = 0.0  # E[distinct] = sum_i 1 - (1 - p_i)^B at each round's B, summed
    prefills: int = 0
    switches: int = 0
    switch_s: float = 0.0  # merge/unmerge time
    load_stall_s: float = 0.0  # iterations stalled by a copy (no overlap) or a merge's load
    idle_load_s: float = 0.0  # GPU idle while waiting requests wait for a copy
    busy_s: float = 0.0
    peak_kv_tokens: float = 0.0
    peak_kv_blocks_waste: float = 0.0  # tokens of KV pages left empty at the KV peak
    peak_adapter_bytes: float = 0.0  # A and B of the adapters running requests use
    peak_running: int = 0


@dataclass
class SimResult:
    policy: str
    switch: str | None
    requests: Requests
    first_token: np.ndarray
    finish: np.ndarray
    missed: np.ndarray  # the request found its adapter off the GPU
    stats: Stats
    kv_tokens: int  # pool size
    loads: int = 0
    host_misses: int = 0
    peak_host_bytes: float = 0.0
    threshold: list[float] = field(default_factory=list)  # dLoRA t_merged / t_unmerged at its decisions


class _Queue:
    """Waiting requests in arrival order: a mask over the ids that have arrived (ids are in arrival order)."""

    def __init__(self, n: int) -> None:
        self.mask = np.zeros(n, dtype=bool)
        self.lo = self.hi = self.count = 0

    def __len__(self) -> int:
        return self.count

    def arrive(self, upto: int) -> None:
        self.mask[self.hi:upto] = True
        self.count += upto - self.hi
        self.hi = upto

    def ids(self) -> np.ndarray:
        return self.lo + np.flatnonzero(self.mask[self.lo:self.hi])

    def remove(self, ids: np.ndarray) -> None:
        self.mask[ids] = False
        self.count -= len(ids)
        rest = np.flatnonzero(self.mask[self.lo:self.hi])
        self.lo = self.lo + int(rest[0]) if rest.size else self.hi


class Simulation:
    """One replica serving ``requests``; :meth:`run` returns the per-request times and counters."""

    def __init__(self, step: StepModel, adapters: AdapterSet, requests: Requests, server: Server,
                 merge: MergeOptions, policy: str, host: Host, kv_tokens: int, popularity: np.ndarray) -> None:
        if policy not in POLICIES:
            raise SpecError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        self.step, self.ad, self.req, self.server = step, adapters, requests, server
        self.policy, self.switch = policy, merge.switch if policy == "merge" else None
        self.max_other = merge.max_other_waiting
        self.p = popularity
        self.pool = kv_tokens
        unified = server.bank == "grouped"  # adapters share the KV pool (S-LoRA's unified paging)
        self.adapter_tokens = (np.ceil(adapters.bytes / step.kv_bytes_per_token) if unified
                               else np.zeros(len(adapters)))
        self.res = Residency(adapters.bytes, adapters.tensors, host, slots=server.max_loras,
                             host_slots=server.max_cpu_loras, storage_bw=server.storage_gb_s * 1e9,
                             overlap=server.load_overlap)
        n, cap = len(requests), server.max_running
        self.first = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.missed = np.zeros(n, dtype=bool)
        self.r_id = np.zeros(cap, dtype=np.int64)
        self.r_ad = np.zeros(cap, dtype=np.int64)
        self.r_len = np.zeros(cap, dtype=np.int64)  # keys the next decode step attends over (prompt + generated)
        self.r_rem = np.zeros(cap, dtype=np.int64)  # decode steps left
        self.n_run = 0
        self.pinned = np.zeros(len(adapters), dtype=np.int64)
        self.waiting = _Queue(n)
        self.merged: int | None = None  # the adapter folded into the weights
        self.stats = Stats()
        self.thresholds: list[float] = []
        self._expected: dict[int, float] = {}
        self.kv_used = 0  # KV tokens the running sequences hold
        self._version, self._distinct = 0, 0  # running-batch version (for cached runs), its distinct adapters
        self._cache: tuple = (-1, None)

    # ---- main loop ----
    def run(self) -> SimResult:
        req, server = self.req, self.server
        arrival, n = req.arrival, len(req)
        clock, nxt, counter, blocked = 0.0, 0, server.admit_every, False
        while True:
            if nxt < n and arrival[nxt] <= clock:
                nxt = int(np.searchsorted(arrival, clock, side="right"))
                self.waiting.arrive(nxt)
                blocked = False
            if self.res.next_landing() <= clock:
                blocked = False
                for a in [a for a, t in self.res.loading.items() if t <= clock]:
                    self.res.ready(a, clock)
            opportunity = not blocked and (self.n_run == 0 or counter >= server.admit_every)
            if self.switch == "threshold" and (opportunity or not self._decodable().size):
                clock = self._decide_mode(clock)
            if self.waiting and opportunity:
                end = self._admit(clock)
                if end is not None:
                    clock, counter = end, 0
                    continue
                blocked = True
            decodable = self._decodable()
            if decodable.size == 0 and self.merged is not None and self.switch == "threshold" and self.n_run:
                clock += self._switch_to(None, clock)  # the paused requests hold the KV: run them unmerged
                blocked = False
                continue
            if decodable.size == 0:
                t_next = min(arrival[nxt] if nxt < n else np.inf, self.res.next_landing())
                if t_next == np.inf:
                    if self.waiting or self.n_run:
                        raise SpecError("serving simulation stalled with requests left (internal error)")
                    break
                if self.waiting and self.res.loading:
                    self.stats.idle_load_s += max(0.0, min(t_next, self.res.next_landing()) - clock)
                clock, blocked = max(clock, t_next), False
                continue
            horizon = np.inf
            if blocked or not self.waiting:
                horizon = min(arrival[nxt] if nxt < n else np.inf, self.res.next_landing())
            limit = max(1, server.admit_every - counter) if (self.waiting and not blocked) else _CHUNK
            clock, steps, finished = self._decode(clock, decodable, limit, horizon)
            counter += steps
            if finished:
                blocked = False
        return SimResult(self.policy, self.switch, req, self.first, self.finish, self.missed, self.stats, self.pool,
                         self.res.loads, self.res.host_misses, self.res.peak_host_bytes, self.thresholds)

    # ---- admission ----
    def _admit(self, clock: float) -> float | None:
        """Admit what fits and run its prefill; the clock after it (None: nothing admitted)."""
        extra = 0.0
        only = None
        if self.policy == "merge" and self.switch == "drain":
            ids = self.waiting.ids()
            if self.n_run == 0:
                loads = self.res.loads
                extra += self._switch_to(int(self.req.adapter[ids[0]]), clock)
                self.missed[ids[0]] |= self.res.loads > loads
            only = self.merged
            own = np.flatnonzero(self.req.adapter[ids] == only)
            if not own.size or own[0] > self.max_other:  # others waiting ahead of its first own request
                return None if extra == 0.0 else clock + extra
        elif self.switch == "threshold" and self.merged is not None:
            only = self.merged
        chosen, stall = self._select(clock + extra, only)
        if not chosen:
            return None if extra == 0.0 else clock + extra
        ids = np.array(chosen, dtype=np.int64)
        self.waiting.remove(ids)
        prefill = self._prefill_time(ids)
        t = extra + stall + prefill
        self.stats.busy_s += stall + prefill
        self.stats.load_stall_s += stall
        self.stats.prefills += 1
        end = clock + t
        self.first[ids] = end
        out = self.req.output[ids]
        done = ids[out <= 1]
        self.finish[done] = end
        live = ids[out > 1]
        k = self.n_run
        m = len(live)
        self.r_id[k:k + m] = live
        self.r_ad[k:k + m] = self.req.adapter[live]
        self.r_len[k:k + m] = self.req.prompt[live] + 1
        self.r_rem[k:k + m] = out[out > 1] - 1
        np.add.at(self.pinned, self.req.adapter[live], 1)
        self.n_run += m
        self.kv_used += int(self.req.prompt[live].sum())
        self.stats.peak_running = max(self.stats.peak_running, self.n_run)
        self._changed()
        return end

    def _select(self, clock: float, only: int | None) -> tuple[list[int], float]:
        """FCFS candidates that fit (slots, loads, token budget, KV); with their synchronous load seconds.

        A request whose adapter is being copied in, or finds no free slot, is passed over (vLLM's scheduler
        moves on to the next request); the token budget and the KV budget stop the scan (head-of-line)."""
        server, req, res = self.server, self.req, self.res
        ids = self.waiting.ids()
        ads = req.adapter[ids]
        if only is not None:
            ids, ads = ids[ads == only], ads[ads == only]
        slotted = self.policy != "merge" or self.switch == "threshold"
        resident = np.zeros(len(self.ad), dtype=bool)
        resident[list(res.gpu)] = True
        chosen: list[int] = []
        taken: set[int] = set()
        tokens, stall, full = 0, 0.0, False
        cur = list(self.r_len[:self.n_run] - 1)
        rem = list(self.r_rem[:self.n_run])
        adapters = set(np.flatnonzero(self.pinned).tolist())
        pos = 0
        while pos < len(ids):
            if slotted and full:  # no slot left: only requests whose adapter is resident can go
                ahead = np.flatnonzero(resident[ads[pos:]])
                if not ahead.size:
                    break
                pos += int(ahead[0])
            r, a = int(ids[pos]), int(ads[pos])
            pos += 1
            if self.n_run + len(chosen) >= server.max_running or tokens + req.prompt[r] > server.max_batch_tokens:
                break
            if slotted:
                if not resident[a]:
                    self.missed[r] = True
                    if a in res.loading:
                        continue
                    seconds = res.request(a, clock, self.pinned, taken)
                    if seconds is None:
                        full = True
                        continue
                    resident[:] = False  # the copy may have evicted an idle adapter
                    resident[list(res.gpu)] = True
                    if res.overlap:
                        continue
                    stall += seconds
                else:
                    res.touch(a)
            need = adapters | {a}
            if _peak(cur + [req.prompt[r]], rem + [req.output[r] - 1]) > \
                    self.pool - self.adapter_tokens[list(need)].sum():
                break
            chosen.append(r)
            taken.add(a)
            adapters = need
            tokens += req.prompt[r]
            cur.append(req.prompt[r])
            rem.append(req.output[r] - 1)
        return chosen, stall

    def _prefill_time(self, ids: np.ndarray) -> float:
        prompts = self.req.prompt[ids]
        adapters = self.req.adapter[ids]
        merged = self.policy == "merge" and (self.switch == "drain" or self.merged is not None)
        if merged:
            return self.step.prefill_time(prompts)
        uniq, inv = np.unique(adapters, return_inverse=True)
        tokens = np.bincount(inv, weights=prompts)
        if self.policy == "dynamic":
            return sum(self.step.prefill_time(prompts[inv == g]) + self.step.lora_time(uniq[g:g + 1], tokens[g:g + 1])
                       for g in range(len(uniq)))
        return self.step.prefill_time(prompts) + self.step.lora_time(uniq, tokens)

    # ---- merging ----
    def _switch_to(self, adapter: int | None, clock: float) -> float:
        """Unmerge the merged adapter and merge ``adapter`` (None: run unmerged); the seconds it stalls."""
        if adapter == self.merged:
            return 0.0
        t = 0.0
        if self.merged is not None:
            t += self.step.merge_time(self.merged)
        load = 0.0
        if adapter is not None:
            if not self.res.ready(adapter, clock):
                seconds = self.res.request(adapter, clock, self.pinned)
                if seconds is None:  # every slot pinned by running requests: merge from the host copy's load anyway
                    seconds = self.res.host.load_time(float(self.ad.bytes[adapter]), int(self.ad.tensors[adapter]))
                load = max(seconds, self.res.loading.pop(adapter, clock) - clock)
                self.res.gpu[adapter] = None
            t += self.step.merge_time(adapter)
        self.merged = adapter
        self._version += 1
        self.stats.switches += 1
        self.stats.switch_s += t
        self.stats.load_stall_s += load
        self.stats.busy_s += t + load
        return t + load

    def _decide_mode(self, clock: float) -> float:
        """dLoRA's rule at an admission point; returns the clock after any mode switch.

        Unmerged, the batch is the running sequences plus the oldest waiting ones up to ``max_running``, mixed;
        merged, it is the most requested adapter's sequences (running and waiting) alone."""
        waiting = self.waiting.ids()
        system = np.concatenate([self.r_ad[:self.n_run], self.req.adapter[waiting]]).astype(np.int64)
        if system.size == 0:
            return clock
        counts = np.bincount(system, minlength=len(self.ad))
        top = int(np.argmax(counts))
        batch = np.bincount(system[:self.server.max_running], minlength=len(self.ad))
        n_all = int(batch.sum())
        n_top = min(int(counts[top]), self.server.max_running)
        ctx = float(self.r_len[:self.n_run].mean()) if self.n_run else float(self.req.prompt[waiting].mean())
        t_m = float(self.step.decode_times(n_top, n_top * ctx)[0])
        present = np.flatnonzero(batch)
        t_u = float(self.step.decode_times(n_all, n_all * ctx)[0]) + self.step.lora_time(present, batch[present])
        self.thresholds.append(t_m / t_u)
        target = top if n_top / t_m > n_all / t_u else None
        if target is not None and target != self.merged and not (self.r_ad[:self.n_run] == target).any():
            first = waiting[self.req.adapter[waiting] == target][:1]
            cur, rem = list(self.r_len[:self.n_run] - 1), list(self.r_rem[:self.n_run])
            if not first.size or _peak(cur + [self.req.prompt[first[0]]], rem + [self.req.output[first[0]] - 1]) \
                    > self.pool - self.adapter_tokens[np.flatnonzero(self.pinned)].sum():
                target = None  # merging it would only pause the running batch
        return clock + self._switch_to(target, clock)

    # ---- decoding ----
    def _decodable(self) -> np.ndarray:
        idx = np.arange(self.n_run)
        if self.policy == "merge" and self.switch == "threshold" and self.merged is not None:
            return idx[self.r_ad[:self.n_run] == self.merged]
        return idx

    def _groups(self, idx: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """(group of each decodable slot or None for one run, sequences per run, LoRA seconds per step per run)
        of the runs a decode round makes; cached until the running batch or the merged adapter changes."""
        if self._cache[0] == self._version:
            return self._cache[1]
        if self.policy == "merge" and (self.switch == "drain" or self.merged is not None):
            out = (None, np.array([len(idx)]), np.zeros(1))
        elif self.policy == "dynamic":
            uniq, inv, counts = np.unique(self.r_ad[idx], return_inverse=True, return_counts=True)
            lora = np.array([self.step.lora_time(uniq[g:g + 1], counts[g:g + 1]) for g in range(len(uniq))])
            out = (inv.reshape(-1), counts, lora)
        else:  # every running sequence decodes: its adapters are the pinned ones
            present = np.flatnonzero(self.pinned)
            out = (None, np.array([len(idx)]), np.array([self.step.lora_time(present, self.pinned[present])]))
        self._cache = (self._version, out)
        return out

    def _decode(self, clock: float, idx: np.ndarray, limit: int, horizon: float) -> tuple[float, int, bool]:
        """Decode rounds until the first finish, ``limit`` rounds, or the round crossing ``horizon``."""
        group, sizes, lora = self._groups(idx)
        full = len(idx) == self.n_run  # every running sequence decodes: slices instead of gathers
        sel = slice(0, self.n_run) if full else idx
        rem, lens = self.r_rem[sel], self.r_len[sel]
        k_max = int(min(rem.min(), limit, _CHUNK))
        keys = np.minimum(lens, self.step.window) if self.step.window else lens
        contexts = np.array([float(keys.sum())]) if group is None else np.bincount(group, weights=keys)
        per_group = self.step.decode_times(sizes, contexts, k_max) + lora[:, None]  # [runs, steps]
        cum = np.cumsum(per_group.sum(axis=0)) if len(sizes) > 1 else np.cumsum(per_group[0])
        k = k_max
        if horizon < np.inf:
            k = int(min(k_max, np.searchsorted(cum, horizon - clock, side="left") + 1))
        self._count(len(idx), k, len(sizes))
        self.r_len[sel] += k
        self.r_rem[sel] -= k
        self.kv_used += k * len(idx)
        spent = float(cum[k - 1])
        self.stats.busy_s += spent
        if self.kv_used > self.stats.peak_kv_tokens:
            self.stats.peak_kv_tokens = self.kv_used
            self.stats.peak_kv_blocks_waste = float((-(self.r_len[:self.n_run] - 1) % self.server.kv_block_tokens)
                                                    .sum())
        finished = self.r_rem[sel] == 0
        if finished.any():
            done = np.flatnonzero(finished) if full else idx[finished]
            before = clock + (float(cum[k - 2]) if k > 1 else 0.0)
            offsets = np.cumsum(per_group[:, k - 1])  # runs of the last round end one after another
            self.finish[self.r_id[done]] = before + (offsets[0] if group is None else offsets[group[finished]])
            self._remove(done)
        return clock + spent, k, bool(finished.any())

    def _count(self, decoded: int, steps: int, runs: int) -> None:
        st, b = self.stats, self.n_run
        st.decode_steps += steps * runs
        st.batch_sum += steps * decoded
        st.rounds += steps
        st.running_sum += steps * b
        st.distinct_sum += steps * self._distinct
        if b not in self._expected:
            self._expected[b] = float(expected_distinct(self.p, b))
        st.expected_sum += steps * self._expected[b]

    def _changed(self) -> None:
        """The running batch changed: refresh what depends on its adapters."""
        self._version += 1
        active = np.flatnonzero(self.pinned)
        self._distinct = len(active)
        self.stats.peak_adapter_bytes = max(self.stats.peak_adapter_bytes, float(self.ad.bytes[active].sum()))

    def _remove(self, slots: np.ndarray) -> None:
        keep = np.ones(self.n_run, dtype=bool)
        keep[slots] = False
        np.subtract.at(self.pinned, self.r_ad[slots], 1)
        self.kv_used -= int((self.r_len[slots] - 1).sum())
        m = int(keep.sum())
        for arr in (self.r_id, self.r_ad, self.r_len, self.r_rem):
            arr[:m] = arr[:self.n_run][keep]
        self.n_run = m
        self._changed()


def _peak(cur: list, rem: list) -> float:
    """Largest KV the batch will hold: sequences sorted by steps left; when the i-th longest finishes,
    the i+1 longest hold cur + rem_i each (LightLLM / S-LoRA's admission check)."""
    c = np.asarray(cur, dtype=float)
    r = np.asarray(rem, dtype=float)
    order = np.argsort(-r, kind="stable")
    return float((r[order] * np.arange(1, len(r) + 1) + np.cumsum(c[order])).max())
