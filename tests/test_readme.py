"""The README's quick starts, run verbatim: every command must succeed and the printed errors against the reference
libraries (PEFT, diffusers) must be small.

Each ```bash block of the "Quick start" section runs with bash in a fresh folder that links the repository's
``models/`` and ``hw_specs/`` (the blocks reach them as ``../models``), with this interpreter's ``bin`` first on PATH.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def run_block(block: str, folder: Path) -> str:
    for name in ("models", "hw_specs"):
        (folder / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def printed(out: str, label: str) -> float:
    """The number the block printed after ``label``."""
    match = re.search(rf"^{re.escape(label)}\s+(\S+)$", out, flags=re.M)
    assert match, f"{label!r} not printed:\n{out[-2000:]}"
    return float(match.group(1))


def test_the_readme_has_both_quick_starts():
    blocks = quick_start_blocks()
    assert len(blocks) == 2 and "lorapass.demo qs" in blocks[0] and "--diffusion" in blocks[1]


@pytest.mark.parametrize("which", ["llm", "diffusion"])
def test_quick_start(which, tmp_path):
    blocks = dict(zip(["llm", "diffusion"], quick_start_blocks()))
    out = run_block(blocks[which], tmp_path)
    if which == "llm":
        work = tmp_path / "qs"
        checks = {"merge vs PEFT:": "a", "a": "a", "b": "b"}
        for label, name in checks.items():
            ref = np.load(work / f"expected_{name}.npy")
            assert printed(out, label) <= 1e-4 * np.abs(ref).max(), (label, out)
        # analyse: all-linear LoRA on Llama-2-70B is 80 layers x 7 projections, in both phases
        assert len(re.findall(r"^GEMM_LORA_A\s+560\s", out, flags=re.M)) == 2, out[-3000:]
    else:
        work = tmp_path / "sd"
        for label, name in {"blend vs diffusers:": "blend", "detail vs diffusers:": "detail"}.items():
            ref = np.load(work / f"expected_unet_{name}.npy")
            assert printed(out, label) <= 1e-4 * np.abs(ref).max(), (label, out)
        for name in ("merged.onnx", "te.onnx", "dynamic.onnx", "detail.onnx_adapter"):
            assert (work / name).is_file(), name
