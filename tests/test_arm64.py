"""The edge path on aarch64: benchmarks/arm64_emulated.sh runs patchgen-sample and the sampler under an emulated
aarch64 Python and compares with this x86_64 machine (same PNG bytes, floats within 1e-4).

It needs an x86_64 Linux host, root (a private mount namespace for the fake /proc/cpuinfo; apt-get), and the
Debian and PyPI registries; qemu-user-static is installed with apt-get when missing. About 90 s from scratch
on the 2-core CI machine, cached under ~/.cache/patchgen-arm64 after that. Elsewhere it skips and says why.
"""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "arm64_emulated.sh"


def missing() -> str:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"the comparison runs on an x86_64 Linux host (this is {platform.system()} {platform.machine()})"
    if os.geteuid() != 0:
        return "needs root: unshare -m and mount --bind for onnxruntime's /proc/cpuinfo, apt-get for the arm64 packages"
    for tool in ("unshare", "apt-get", "dpkg"):
        if shutil.which(tool) is None:
            return f"needs {tool} (a Debian-like host)"
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        return "unshare -m is not permitted here (a container without CAP_SYS_ADMIN)"
    if not Path("/usr/share/keyrings/debian-archive-keyring.gpg").is_file():
        return "needs Debian's archive keyring (/usr/share/keyrings/debian-archive-keyring.gpg)"
    return ""


@pytest.mark.skipif(bool(missing()), reason=missing() or "runs")
def test_aarch64_samples_the_same_images_as_x86_64():
    r = subprocess.run([str(SCRIPT)], env={**os.environ, "X86_PY": sys.executable}, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "PNG from patchgen-sample: identical bytes" in r.stdout, r.stdout
    assert "PASS: worst float difference" in r.stdout, r.stdout
