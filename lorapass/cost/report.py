"""Output of an analysis: text tables, JSON, per-operator CSV and a roofline plot."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from lorapass.cost.analysis import Analysis, Sweep
from lorapass.cost.hw import HardwareSpec


def _t(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.2f} us"


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3f}"


def _table(rows: list[tuple]) -> list[str]:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def format_analysis(a: Analysis, classes: bool = True) -> str:
    """The phase table, the headline numbers, memory per device, and a table per phase and operator class."""
    w, lay = a.workload, a.layout
    lines = [f"{a.model} on {lay.devices} x {a.hardware}, {lay.label()}; batch {w.batch}, seq {w.seq}, gen {w.gen}; "
             f"LoRA {a.strategy}" + (f" on {a.lora_sites} sites" if a.lora_sites else ""), ""]
    over = a.overhead
    rows = [("phase", "time", "TFLOP/dev", "GB/dev", "compute", "memory", "comm", "bound", "ubatch", "bubble",
             "LoRA +%")]
    for name, p in a.phases.items():
        rows.append((name, _t(p.time), f"{p.flops / 1e12:.3f}", _gb(p.bytes), _t(p.compute_time), _t(p.memory_time),
                     _t(p.comm_time), p.bound, p.microbatches, f"{100 * p.bubble:.1f}%",
                     f"{over[name]:.2f}" if name in over else "-"))
    lines += _table(rows)
    tps = f"{a.tokens_per_s:.1f}" if a.tokens_per_s else "-"
    lines += ["", f"TTFT {_t(a.ttft)}   TPOT {_t(a.tpot)}   decode tokens/s {tps}   end-to-end {_t(a.e2e)}"]
    m = a.memory
    lines += ["", "memory per device (GB): " + "  ".join(
        f"{k} {_gb(v)}" for k, v in (("weights", m.weights), ("adapters", m.adapters), ("kv_cache", m.kv_cache),
                                     ("activations", m.activations), ("total", m.total), ("capacity", m.capacity)))
        + ("   fits" if m.fits else "   DOES NOT FIT")]
    if lay.pp > 1:
        lines.append("pipeline stages (layers): " + "  ".join(f"[{s[0]}-{s[-1]}]" if s else "[]" for s in a.stages))
    if classes:
        for name, p in a.phases.items():
            lines += ["", f"{name}: per operator class (per device, all micro-batches)"]
            rows = [("class", "count", "GFLOP", "GB", "time", "comm", "share", "bound")]
            for cls, r in sorted(p.classes.items(), key=lambda kv: -kv[1]["share"]):
                rows.append((cls, r["count"], f"{r['flops'] / 1e9:.3f}", _gb(r["bytes"]), _t(r["time"]),
                             _t(r["comm_time"]), f"{100 * r['share']:.1f}%", r["bound"]))
            lines += _table(rows)
    return "\n".join(lines)


def format_sweep(s: Sweep, top: int = 20) -> str:
    lines = [f"{len(s.results)} layouts ranked by {s.objective} ({s.seconds:.2f} s)"]
    rows = [("#", "layout", "devices", "TTFT", "TPOT", "tokens/s", "mem/dev GB", "fits", "LoRA +% prefill/decode")]
    for k, a in enumerate(s.results[:top], 1):
        over = a.overhead
        lo = "/".join(f"{over[p]:.1f}" for p in ("prefill", "decode") if p in over) or "-"
        rows.append((k, a.layout.label(), a.layout.devices, _t(a.ttft), _t(a.tpot),
                     f"{a.tokens_per_s:.1f}" if a.tokens_per_s else "-", _gb(a.memory.total),
                     "yes" if a.memory.fits else "no", lo))
    return "\n".join(lines + _table(rows))


def sweep_dict(s: Sweep) -> dict:
    return {"objective": s.objective, "seconds": s.seconds, "count": len(s.results),
            "results": [a.to_dict() for a in s.results], "skipped": s.skipped}


def to_json(a: Analysis, ops: bool = False) -> str:
    return json.dumps(a.to_dict(ops=ops), indent=2, default=float)


CSV_FIELDS = ["phase", "stage", "name", "class", "path", "layer", "tp", "flops", "bytes", "intensity", "compute_s",
              "memory_s", "time_s", "comm_s", "bound"]


def write_csv(a: Analysis, path: str | os.PathLike) -> int:
    """One row per operator and phase (per device); returns the number of rows."""
    count = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for name, p in a.phases.items():
            for row in p.ops or []:
                writer.writerow({"phase": name, **row})
                count += 1
    return count


def write_sweep_csv(s: Sweep, path: str | os.PathLike) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "layout", "tp", "pp", "ep", "dp", "devices", "ttft_s", "tpot_s", "tokens_per_s",
                         "e2e_s", "memory_gb", "fits"])
        for k, a in enumerate(s.results, 1):
            lay = a.layout
            writer.writerow([k, lay.label(), lay.tp, lay.pp, lay.ep, lay.dp, lay.devices, a.ttft, a.tpot,
                             a.tokens_per_s, a.e2e, a.memory.total / 1e9, a.memory.fits])


def plot_roofline(a: Analysis, spec: HardwareSpec, path: str | os.PathLike, dtype: str | None = None) -> Path:
    """Every operator of every phase at (FLOP/byte, achieved FLOP/s) under the device's roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    peak = spec.peak(dtype or a.dtype) * spec.efficiency.compute
    bw = spec.bandwidth * spec.efficiency.memory
    fig, ax = plt.subplots(figsize=(9, 6))
    markers = {"prefill": "o", "decode": "s", "merge": "^"}
    classes = sorted({r["class"] for p in a.phases.values() for r in p.ops or [] if r["flops"] > 0})
    colors = dict(zip(classes, plt.cm.tab20(np.linspace(0, 1, max(len(classes), 1)))))
    xs = []
    for name, p in a.phases.items():
        for cls in classes:
            rows = [r for r in p.ops or []
                    if r["class"] == cls and r["flops"] > 0 and r["bytes"] > 0 and r["time_s"] > 0]
            if not rows:
                continue
            x = [r["flops"] / r["bytes"] for r in rows]
            y = [r["flops"] / r["time_s"] for r in rows]
            xs += x
            ax.scatter(x, y, s=14, marker=markers.get(name, "o"), color=colors[cls], alpha=0.7,
                       label=f"{name} {cls}")
    lo, hi = (min(xs) / 2, max(xs) * 2) if xs else (1e-2, 1e4)
    grid = np.logspace(np.log10(lo), np.log10(hi), 200)
    ax.plot(grid, np.minimum(peak, bw * grid), "k-", lw=1.5, label="roofline")
    ax.axvline(peak / bw, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attained FLOP/s per device")
    ax.set_title(f"{a.model} on {a.hardware}, {a.layout.label()}")
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
