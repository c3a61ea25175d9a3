"""The serving simulation against S-LoRA's published merge ablation.

Source: Y. Sheng et al., "S-LoRA: Serving Thousands of Concurrent LoRA Adapters" (arXiv:2311.03285, MLSys 2024),
section 7.5 "Merging adapter weights versus computing on-the-fly": A10G (24 GB), LLaMA-7B, requests/s of the
merge design ("update the base model with the current adapter before each new batch; switch to a new adapter
if there are too many waiting requests") against S-LoRA's mixed batches. The numbers are the paper's rows as the
authors' repository records them: github.com/S-LoRA/S-LoRA, benchmarks/paper/ablation_merge/
ablation_merge_a10g_merge.jsonl and ablation_merge_a10g_slora.jsonl, configs with req_rate 2, cv 1, duration 60,
input_range [8, 512], output_range [8, 512] (alpha 1 is the paper's uniform popularity).

The workload, exactly as the paper's generator draws it (S-LoRA's benchmarks/trace.py ``generate_requests``,
seed 42): 120 requests = rate 2 x 60 s; adapter = floor(n * x), x ~ power(alpha); prompt and output lengths
uniform integers in [8, 512); Gamma inter-arrivals with cv 1 (Poisson). The trace is written as a CSV and fed
through ``arrivals: trace``.

The server, from the same repository: KV pool of 14000 tokens (benchmarks/launch_server.py, a10g), 3072 prompt
tokens per prefill (slora/server/api_server.py: max(pool / 6, max_req_total_len 3072)), admission every 10
decode steps (router/manager.py ``max_wait_tokens``), the merge scheduler's 30 waiting requests of other adapters
(router/peft_req_queue.py), peak-KV reservation admission (router/req_queue.py), adapters loaded synchronously
from host memory (no prefetch), adapters sharing the KV pool (unified paging), grouped (unpadded) bank kernels.
Adapters: the paper's setting S2, ranks 64, 32, 16, 8 assigned round-robin (benchmarks/exp_suite.py), on
q, k, v, o (the merge code folds exactly these: models/peft/lora_single_batch_infer.py). Model: huggyllama/
llama-7b in fp16 (models/llama-7b.yaml).

What the prediction rests on (one model for every row, nothing fitted per row):
- kernel efficiency: the A10G spec's 0.7 of peak FLOP/s and 0.8 of 600 GB/s for every operator, LoRA's too;
- kernel launches: ``kernel_overhead_us`` 5 (S-LoRA runs eager PyTorch/Triton, no CUDA graphs); the rows are
  also checked with 0 us (the spec's CUDA-graph default), which keeps every verdict;
- the published generator's arrival and length distributions (above), not fitted ones;
- continuous batching as LightLLM/S-LoRA schedule it: prefill and decode in separate iterations.
Measured alternatives: setting S1 (every adapter rank 8) gives the same verdicts within the same bounds.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lorapass.cost.analysis import ModelSource
from lorapass.cost.hw import load_spec
from lorapass.cost.serving import setup as serving_setup
from lorapass.cost.serving.workload import from_dict

ROOT = Path(__file__).resolve().parents[1]

# (adapters, alpha): (merge req/s, S-LoRA req/s), Sheng et al. 2023, section 7.5
PUBLISHED = {(1, 1.0): (1.587, 1.412), (2, 0.1): (1.354, 1.407), (2, 1.0): (1.150, 1.442), (5, 1.0): (0.733, 1.421)}
SERVER = {"kv_tokens": 14000, "max_batch_tokens": 3072, "admit_every": 10, "max_running": 1000,
          "kv_block_tokens": 1, "load_overlap": False, "bank": "grouped"}


def slora_trace(path: Path, adapters: int, alpha: float, rate: float = 2, cv: float = 1, duration: float = 60,
                seed: int = 42) -> None:
    """S-LoRA's synthetic workload generator, draw for draw (same legacy RNG, same order of draws)."""
    rng = np.random.RandomState(seed)
    n = int(rate * duration)
    ids = (rng.power(alpha, n) * adapters).astype(int)
    prompt, output = rng.randint(8, 512, n), rng.randint(8, 512, n)
    t = np.cumsum(rng.gamma(1 / (cv * cv), cv * cv / rate, n))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp_s", "prompt_tokens", "output_tokens", "adapter"])
        w.writerows(zip(t, prompt, output, ids))


def predict(tmp_path: Path, adapters: int, alpha: float, overhead_us: float) -> tuple[float, float]:
    trace = tmp_path / f"trace_{adapters}_{alpha}.csv"
    slora_trace(trace, adapters, alpha)
    wf = from_dict({"adapters": {"count": adapters, "ranks": [64, 32, 16, 8],
                                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                    "arrivals": {"kind": "trace", "file": trace.name},
                    "merge": {"switch": "drain", "max_other_waiting": 30},
                    "server": {**SERVER, "kernel_overhead_us": overhead_us}}, folder=tmp_path)
    st = serving_setup.build(ModelSource(ROOT / "models" / "llama-7b.yaml"), load_spec(ROOT / "hw_specs/a10g.yaml"),
                             wf)
    merge, mixed = st.simulate("merge", "drain"), st.simulate("multi")
    return len(merge.requests) / np.nanmax(merge.finish), len(mixed.requests) / np.nanmax(mixed.finish)


@pytest.mark.parametrize("overhead_us", [5.0, 0.0])
def test_slora_merge_ablation(tmp_path, overhead_us):
    rows = {}
    for (n, alpha), (pub_merge, pub_mixed) in PUBLISHED.items():
        merge, mixed = predict(tmp_path, n, alpha, overhead_us)
        rows[(n, alpha)] = (merge, mixed)
        assert (merge > mixed) == (pub_merge > pub_mixed), f"{n} adapters, alpha {alpha}: winner differs"
        ratio, published = merge / mixed, pub_merge / pub_mixed
        assert published * 0.75 <= ratio <= published * 1.25, (n, alpha, ratio, published)
        if overhead_us:  # the documented assumption set also lands the absolute requests/s within 25%
            assert merge == pytest.approx(pub_merge, rel=0.25) and mixed == pytest.approx(pub_mixed, rel=0.25)
    # the trend the paper reports: merging loses more the more (and the more evenly used) adapters there are
    ratios = {k: m / x for k, (m, x) in rows.items()}
    assert ratios[(1, 1.0)] > ratios[(2, 0.1)] > ratios[(2, 1.0)] > ratios[(5, 1.0)]
