"""The serving analysis as a table, and its plot: throughput and p99 TTFT against adapter count per policy."""

from __future__ import annotations

import os
from pathlib import Path

from lorapass.cost.serving.analyse import ServingReport


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def format_report(r: ServingReport) -> str:
    lines = [f"{r.model} on {r.hardware}: {r.requests} requests over {r.adapters} adapters ({r.workload}), "
             f"KV pool {r.kv_pool_tokens} tokens", ""]
    head = (f"{'policy':<16}{'req/s':>8}{'tok/s':>9}{'TTFT p50':>10}{'p99':>9}{'TPOT p50':>10}{'p99':>8}"
            f"{'SLO':>7}{'batch':>7}{'distinct':>9}{'E[d]':>6}{'miss':>7}{'switch':>7}")
    lines += [head + "   (seconds)", "-" * len(head)]
    for name, s in r.policies.items():
        slo = "-" if s["slo_attainment"] is None else f"{s['slo_attainment']:.0%}"
        ad = s["adapters"]
        lines.append(f"{name:<16}{s['throughput_req_s']:>8.2f}{s['throughput_tok_s']:>9.0f}"
                     f"{_s(s['ttft_s']['p50']):>10}{_s(s['ttft_s']['p99']):>9}{_s(s['tpot_s']['p50']):>10}"
                     f"{_s(s['tpot_s']['p99']):>8}{slo:>7}{s['batch']['mean_running']:>7.1f}"
                     f"{ad['distinct_per_batch']:>9.2f}{ad['expected_distinct_per_batch']:>6.1f}"
                     f"{ad['miss_rate']:>7.1%}{s['switches']:>7}")
    first = next(iter(r.policies.values()))["memory_gb"]
    lines += ["", "memory (GB): " + ", ".join(f"{k} {v:.2f}" for k, v in first.items())]
    for name, s in r.policies.items():
        m = s["memory_gb"]
        lines.append(f"  {name:<14} KV peak {m['kv_peak']:.2f}, adapter slots {m['adapter_slots']:.3f}, "
                     f"fragmentation {m['fragmentation']:.3f}, host cache {m['host_adapter_cache']:.2f}; "
                     f"stalls: merge {s['stalls_s']['merge_switch']:.2f} s, load {s['stalls_s']['load']:.2f} s, "
                     f"idle on loads {s['stalls_s']['idle_on_load']:.2f} s")
    a = r.advisor
    lines += ["", f"advisor: {a['verdict']}"] + [f"  - {reason}" for reason in a["reasons"]]
    return "\n".join(lines)


def plot_sweep(r: ServingReport, path: str | os.PathLike) -> Path:
    """Throughput (left) and p99 TTFT (right) against adapter count, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in dict.fromkeys(row["policy"] for row in r.sweep):
        rows = [row for row in r.sweep if row["policy"] == name]
        x = [row["adapters"] for row in rows]
        left.plot(x, [row["throughput_req_s"] for row in rows], "o-", label=name)
        right.plot(x, [row["ttft_p99_s"] for row in rows], "o-", label=name)
    for ax, ylabel in ((left, "throughput (req/s)"), (right, "p99 TTFT (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("adapters")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle(f"{r.model} on {r.hardware}: {r.requests} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
