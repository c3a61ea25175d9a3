"""The advisor: which policy to run, and the break-even figures behind the choice.

- Verdict: the policy with the highest goodput (throughput x SLO attainment; throughput without SLOs); goodputs
  within 1% tie and the simpler policy wins (merge drain, dynamic, multi, merge threshold), then p99 TTFT.
- Requests per adapter before merging pays off: a switch costs unmerge + merge + the adapter's load
  (C = 2 * merge + load of the most popular adapter); every request served unmerged pays the LoRA branch,
  d = its prompt's LoRA prefill + (output - 1) decode steps of one sequence's share of a single-adapter
  step's LoRA time at the simulated batch. Merging pays off once an adapter gets N* = C / d requests per merge.
- Share above which merging the hottest adapter wins (dLoRA's rule on this model's costs): a merged batch of
  the hottest adapter's s*B requests serves s*B / t_merged(s*B) requests per second, the mixed batch
  B / t_mixed(B) (base + bank at the expected composition: the E[distinct] most popular adapters, tokens in
  proportion to popularity); the break-even share s* solves the equality (bisection). None where there is no
  break-even (no LoRA cost to save; a merged batch never wins).
"""

from __future__ import annotations

import numpy as np

from lorapass.cost.serving.setup import Setup
from lorapass.cost.serving.trace import expected_distinct


# fewer moving parts first: a merged model, per-run adapter swaps, an adapter bank, both modes
_SIMPLER = ("merge:drain", "dynamic", "multi", "merge:threshold")


def _ranked(summaries: dict[str, dict]) -> list[str]:
    """Best goodput first; goodputs within 1% of each other tie, broken by the simpler policy, then p99 TTFT."""
    best = max(s["goodput_req_s"] for s in summaries.values())

    def key(name: str):
        s = summaries[name]
        p99 = s["ttft_s"]["p99"]
        near = s["goodput_req_s"] >= 0.99 * best
        simpler = _SIMPLER.index(name) if name in _SIMPLER else len(_SIMPLER)
        return (not near, -s["goodput_req_s"] if not near else 0.0, simpler, p99 if p99 is not None else np.inf)

    return sorted(summaries, key=key)


def break_even(setup: Setup, batch: float) -> dict[str, float | None]:
    """The two break-even figures at a decode batch of ``batch`` sequences."""
    step, req, p = setup.step, setup.requests, setup.popularity
    b = max(1, int(round(batch)))
    hot = int(np.argmax(p))
    ctx = float(req.prompt.mean() + req.output.mean() / 2)
    host = setup.spec.host
    switch = 2 * step.merge_time(hot) + host.load_time(float(setup.adapters.bytes[hot]),
                                                       int(setup.adapters.tensors[hot]))
    per_request = (step.lora_time(np.array([hot]), np.array([float(req.prompt.mean())]))
                   + float(req.output.mean() - 1) * step.lora_time(np.array([hot]), np.array([b])) / b)
    k = max(1, int(round(float(expected_distinct(p, b)))))
    top = np.argsort(-p, kind="stable")[:k]
    tokens = b * p[top] / p[top].sum()
    t_mixed = float(step.decode_times(b, b * ctx)[0]) + step.lora_time(top, tokens)

    def gain(s: float) -> float:
        n = max(s * b, 1e-9)
        return n / float(step.decode_times(n, n * ctx)[0]) - b / t_mixed

    lo, hi = 1e-6, 1.0
    if gain(hi) < 0:
        share = None  # even a batch of that adapter alone loses to the mixed batch
    else:
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if gain(mid) < 0 else (lo, mid)
        share = hi
    return {"batch": float(b), "switch_s": switch, "lora_s_per_request": per_request,
            "requests_per_merge": switch / per_request if per_request > 0 else None,
            "merge_share": share, "hottest_share": float(p[hot]), "t_mixed_s": t_mixed}


def advise(setup: Setup, summaries: dict[str, dict]) -> dict:
    """Verdict, ranking and break-even figures for the simulated policies."""
    order = _ranked(summaries)
    best = summaries[order[0]]
    ref = next((summaries[k] for k in ("multi", "dynamic") if k in summaries), best)
    be = break_even(setup, ref["batch"]["mean_running"])
    drain = summaries.get("merge:drain") or next((v for k, v in summaries.items() if k.startswith("merge")), None)
    per_switch = drain["requests"] / max(drain["switches"], 1) if drain else None
    metric = "goodput" if best["slo_attainment"] is not None else "throughput"
    reasons = [f"{order[0]} gives the best {metric} (within 1% the simpler policy): {best['goodput_req_s']:.2f} "
               f"req/s, p99 TTFT {best['ttft_s']['p99']:.3g} s; ranking " + " > ".join(order)]
    if be["requests_per_merge"] is not None:
        reasons.append(f"merging pays off after {be['requests_per_merge']:.0f} requests per adapter per merge "
                       f"(switch {be['switch_s'] * 1e3:.1f} ms vs {be['lora_s_per_request'] * 1e3:.2f} ms of LoRA "
                       f"per request)" + (f"; the merge policy served {per_switch:.0f} per merge" if per_switch else ""))
    if be["merge_share"] is not None:
        verdict = "above" if be["hottest_share"] >= be["merge_share"] else "below"
        reasons.append(f"merging the hottest adapter beats mixed batches once it has {be['merge_share']:.0%} of "
                       f"the batch; it has {be['hottest_share']:.0%} ({verdict} the break-even)")
    else:
        reasons.append("a merged single-adapter batch never beats the mixed batch here")
    return {"verdict": order[0], "ranking": order, "break_even": {**be, "requests_per_switch": per_switch},
            "reasons": reasons}
