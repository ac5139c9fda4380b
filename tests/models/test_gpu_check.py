"""scripts/gpu_check.py runs here too: on a CPU it checks what a CPU can and says what it skipped."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_check_runs_on_the_cpu_and_skips_only_the_gpu_parts(mgmflow_home):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "MGMFLOW_HOME": str(mgmflow_home)})
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert summary.startswith("gpu_check ok on CPU in ")
    for part in ("parity ok (fp16 ", "bf16 ", "batch ok (", "diffusion ok (5 tasks fp16)",
                 "multi-gpu skipped (needs 2+ CUDA devices)"):
        assert part in summary, summary
    assert "VRAM figures and the multi-GPU split skipped" in done.stdout
    for task in ("text_to_image", "img2img", "inpaint", "instruct"):
        assert f"diffusion {task} (" in done.stdout
