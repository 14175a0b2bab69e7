"""Starting a 2-rank torchrun job from a test (gloo on CPU ranks), shared by the distributed tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def torchrun(job: Path, folder: Path, out: Path, **env_extra: str) -> subprocess.CompletedProcess[str]:
    """Run `job MODEL_FOLDER OUT_FOLDER` on two CPU ranks; its temporary files (torch elastic's per-run log
    folders among them, which torchrun never removes) go to a folder beside `out`, not the system's /tmp."""
    launcher = Path(sys.executable).with_name("torchrun")
    command = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    path = os.pathsep.join(p for p in (str(job.parent), os.environ.get("PYTHONPATH", "")) if p)
    scratch = out.with_name(out.name + "-tmp")
    scratch.mkdir(exist_ok=True)
    # CPU ranks: results are compared with CPU runs here (scripts/gpu_check.sh runs the jobs on CUDA itself)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "MECHSCOPE_TEST_DEVICE": "cpu"}
    return subprocess.run(
        [*command, "--standalone", "--nproc_per_node", "2", str(job), str(folder), str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**env, "TMPDIR": str(scratch), **env_extra},
    )
