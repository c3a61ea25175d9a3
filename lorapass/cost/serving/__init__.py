"""Serving many adapters: a seeded continuous-batching simulation over the analyser's per-step roofline.

Modules, one job each:

- :mod:`~lorapass.cost.serving.workload`: the workload file's schema (errors name the key).
- :mod:`~lorapass.cost.serving.trace`: requests (arrivals, lengths, adapter ids) from the workload or a trace;
  popularity; E[distinct adapters].
- :mod:`~lorapass.cost.serving.adapters`: the adapter set (rank per site), bytes, bank gather, padding waste.
- :mod:`~lorapass.cost.serving.step`: iteration times (prefill, decode, LoRA bank, merge) fitted from the
  operator graph's roofline.
- :mod:`~lorapass.cost.serving.residency`: GPU slots and the host cache (LRU), host->device loads.
- :mod:`~lorapass.cost.serving.simulate`: the engine and the merge / dynamic / multi policies.
- :mod:`~lorapass.cost.serving.setup`: what one analysis shares (adapters, step model, requests, KV pool).
- :mod:`~lorapass.cost.serving.metrics`, :mod:`~lorapass.cost.serving.advisor`: figures, verdict, break-evens.
- :mod:`~lorapass.cost.serving.analyse`, :mod:`~lorapass.cost.serving.report`,
  :mod:`~lorapass.cost.serving.command`: the run, its table / plot, the ``--workload`` CLI branch.
"""
