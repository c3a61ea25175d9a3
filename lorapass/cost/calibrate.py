"""Measure this machine with ONNX Runtime (the runtime the predictions are checked against) and write a spec.

- GEMM FLOP/s: ``x[M,K] @ W[K,N]`` fp32 with W an initializer, for a few shapes; the best is the fp32 peak.
- Memory bandwidth: a chain of ``x[1,K] @ W_i[K,K]`` over weights far larger than the last-level cache, i.e.
  what a decode step does (weights streamed by matrix-vector products); ``y = x * c`` over a large buffer
  (read + write per element) is measured and reported beside it.
- Kernel overhead: a chain of tiny ``Add`` nodes; time per node.

Achieved numbers are written with efficiency 1.0 (they already are what an operator reaches). The machine is
one device: its interconnect fields are placeholders that no single-device layout uses.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lorapass.errors import SpecError
from lorapass.progress import bar


def _session(model: onnx.ModelProto, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "calibrate", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def best_time(session, feeds: dict, repeat: int, min_time: float = 0.2) -> float:
    """Fastest of at least ``repeat`` runs (and ``min_time`` seconds) after a warm-up.

    The minimum, not the median: on a shared machine other processes only ever add time, so the fastest run
    is the best estimate of what the hardware does (measurements to compare with are taken the same way)."""
    session.run(None, feeds)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
        if len(times) > 10 * repeat:
            break
    return float(np.min(times))


def gemm_flops(m: int, k: int, n: int, threads: int | None = None, repeat: int = 5) -> float:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "W")
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    s = _session(model, threads)
    t = best_time(s, {"x": rng.standard_normal((m, k), dtype=np.float32)}, repeat)
    return 2.0 * m * k * n / t


def stream_bandwidth(elements: int, threads: int | None = None, repeat: int = 5) -> float:
    c = numpy_helper.from_array(np.array(1.0001, dtype=np.float32), "c")
    model = _model([helper.make_node("Mul", ["x", "c"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [elements])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [elements])], [c])
    s = _session(model, threads)
    t = best_time(s, {"x": np.ones(elements, dtype=np.float32)}, repeat)
    return 2.0 * elements * 4 / t


def gemv_bandwidth(k: int, n: int, layers: int = 1, threads: int | None = None, repeat: int = 5) -> float:
    """Bytes/s of ``layers`` chained ``x[1,k] @ W_i[k,n]`` (n = k when chained): weights streamed as in decode."""
    rng = np.random.default_rng(1)
    if layers > 1 and n != k:
        raise ValueError("a chain of matrix-vector products needs square weights")
    inits = [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.01, f"W{i}")
             for i in range(layers)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"v{i - 1}", f"W{i}"], [f"v{i}"]) for i in range(layers)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                   [helper.make_tensor_value_info(f"v{layers - 1}", TensorProto.FLOAT, [1, n])], inits)
    s = _session(model, threads)
    t = best_time(s, {"x": rng.standard_normal((1, k), dtype=np.float32)}, repeat)
    return layers * (k * n + k + n) * 4 / t


def kernel_overhead(nodes: int = 200, threads: int | None = None, repeat: int = 20) -> float:
    one = numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one")
    chain = [helper.make_node("Add", ["x" if i == 0 else f"v{i - 1}", "one"], [f"v{i}"]) for i in range(nodes)]
    model = _model(chain, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                   [helper.make_tensor_value_info(f"v{nodes - 1}", TensorProto.FLOAT, [1])], [one])
    s = _session(model, threads)
    return best_time(s, {"x": np.ones(1, dtype=np.float32)}, repeat) / nodes


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return 1.0


def _llc_mb() -> float | None:
    best = None
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")) if base.is_dir() else []:
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1e3 * 1.024, "M": 1e6 * 1.048576}.get(size[-1:], 1.0)
        value = float(size[:-1]) * scale / 1e6 if size[-1:] in "KM" else float(size) / 1e6
        best = max(best or 0.0, value)
    return round(best, 3) if best else None


def measure(threads: int | None = None, quick: bool = False) -> dict:
    """Every measurement, in the spec's units (TFLOP/s, TB/s, us) plus the raw values."""
    shapes = [(128, 1024, 1024), (512, 2048, 2048)] if quick else [(128, 1024, 1024), (256, 2048, 2048),
                                                                     (512, 2048, 2048), (1024, 4096, 4096)]
    gemms = {f"{m}x{k}x{n}": gemm_flops(m, k, n, threads) for m, k, n in bar(shapes, desc="gemm", unit="shape")}
    stream = stream_bandwidth(32 * 2**20 if quick else 64 * 2**20, threads)
    # 128 MiB of 2048x2048 fp32 weights, 4x the largest cache here: DRAM-bound as a decode step is
    gemv = gemv_bandwidth(2048, 2048, layers=8 if quick else 16, threads=threads)
    overhead = kernel_overhead(threads=threads)
    return {"gemm_flops": gemms, "stream_bandwidth": stream, "gemv_bandwidth": gemv, "kernel_overhead_s": overhead,
            "peak_tflops_fp32": max(gemms.values()) / 1e12, "memory_bandwidth_tb_s": gemv / 1e12}


def spec_yaml(result: dict, name: str = "local") -> str:
    """The measurements as a hardware spec file (with how each number was obtained in comments)."""
    import onnxruntime as ort

    gemms = ", ".join(f"{k}: {v / 1e9:.1f}" for k, v in result["gemm_flops"].items())
    llc = _llc_mb()
    lines = [
        f"# Measured by `lorapass calibrate` on {platform.node() or 'this machine'} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)",
        f"# with ONNX Runtime {ort.__version__} CPUExecutionProvider, {time.strftime('%Y-%m-%d %H:%M')}.",
        f"name: {name}",
        "source: lorapass calibrate",
        "peak_tflops:",
        f"  fp32: {result['peak_tflops_fp32']:.6g}   # best fp32 MatMul GFLOP/s by MxKxN: {gemms}",
        "  bf16: null      # not measured: ONNX Runtime's CPU provider runs fp32",
        f"memory_bandwidth_tb_s: {result['memory_bandwidth_tb_s']:.6g}   # chained fp32 GEMV streaming weights "
        f"(stream Mul: {result['stream_bandwidth'] / 1e9:.2f} GB/s)",
        f"memory_capacity_gib: {_memory_gib()}   # MemTotal",
        f"l2_cache_mb: {llc if llc else 'null'}   # largest CPU cache level (sysfs)",
        "efficiency:        # measured numbers are achieved ones",
        "  compute: 1.0",
        "  memory: 1.0",
        "interconnect:      # one device: placeholders, unused by single-device layouts",
        "  devices_per_node: 1",
        "  intra_node: {bandwidth_gb_s: 10, latency_us: 10}",
        "  inter_node: {bandwidth_gb_s: 1, latency_us: 50}",
        f"kernel_overhead_us: {result['kernel_overhead_s'] * 1e6:.4g}   # per ONNX Runtime node, chain of tiny Adds",
    ]
    return "\n".join(lines) + "\n"


def calibrate(output: str | os.PathLike, threads: int | None = None, quick: bool = False, name: str = "local") -> dict:
    """Measure and write ``output``; returns the measurements."""
    output = Path(output)
    if output.parent and not output.parent.exists():
        raise SpecError(f"{output}: folder {output.parent} does not exist")
    result = measure(threads, quick)
    output.write_text(spec_yaml(result, name), encoding="utf-8")
    return result
