"""The console scripts on an edge install: patchgen-train and patchgen-export without their extras say what to
install, in one line with exit code 2; with them, they run."""
import subprocess
import sys

import pytest

from conftest import BLOCK_TORCH


def run_entry(name: str, *args: str, block_torch: bool) -> subprocess.CompletedProcess:
    code = (BLOCK_TORCH if block_torch else "") + (
        f"import sys\nsys.argv = ['patchgen-{name}', *sys.argv[1:]]\nfrom patchgen.cli.entry import {name}\n{name}()\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name,extra", [("train", "train"), ("export", "export")])
def test_a_command_without_its_extra_says_what_to_install(name, extra):
    r = run_entry(name, "--help", block_torch=True)
    assert r.returncode == 2 and not r.stdout
    assert r.stderr.strip() == (f"Error: patchgen-{name} needs the {extra} extra (torch not installed): "
                                f"pip install 'patchgen[{extra}]'")


@pytest.mark.quick
@pytest.mark.parametrize("name", ["train", "export"])
def test_a_command_with_its_extra_runs(name):
    r = run_entry(name, "--help", block_torch=False)
    assert r.returncode == 0 and r.stdout.startswith(f"Usage: patchgen-{name} "), r.stderr
