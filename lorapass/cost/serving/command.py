"""The ``--workload`` branch of ``lorapass analyse``: argument checks, the run, its table / JSON / plot."""

from __future__ import annotations

import argparse
import json

from lorapass.errors import SpecError

_ONE_BATCH = {"batch": 1, "seq": 2048, "gen": 256}  # the single-batch analysis' own defaults
_UNUSED = ("sweep", "csv", "ops", "adapter", "rules", "strategy", "devices", "microbatches", "sp")


def cmd_serving(args: argparse.Namespace) -> int:
    from lorapass.cost.analysis import ModelSource
    from lorapass.cost.cli import _dims
    from lorapass.cost.hw import load_spec
    from lorapass.cost.serving.analyse import analyse_serving
    from lorapass.cost.serving.report import format_report, plot_sweep
    from lorapass.cost.serving.workload import load_workload

    given = [f"--{k}" for k in _UNUSED if getattr(args, k, None)]
    given += [f"--{k}" for k, v in _ONE_BATCH.items() if getattr(args, k) != v]
    given += [f"--{k}" for k in ("pp", "ep", "dp") if getattr(args, k) != 1]
    if given:
        raise SpecError(f"--workload simulates one replica serving the workload's requests and adapters; "
                        f"{', '.join(given)} do not apply (use --tp for tensor parallelism)")
    spec = load_spec(args.hw)
    wf = load_workload(args.workload)
    source = ModelSource(args.model, attention=args.attention, logits=args.logits, dtype=args.dtype,
                         kv_dtype=args.kv_dtype, prefix=args.prefix, dims=_dims(args.dims))
    report = analyse_serving(source, spec, wf, args.policy or "all", tp=args.tp, with_sweep=bool(args.plot))
    if args.plot:
        plot_sweep(report, args.plot)
    print(json.dumps(report.to_dict(), indent=2, default=float) if args.json else format_report(report))
    return 0

