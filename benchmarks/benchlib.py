"""Shared benchmark plumbing: fresh processes measured by the kernel, random-weight models, result files."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.machine()} {cpu or platform.processor()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run_fresh(argv: list[str], env: dict | None = None) -> dict:
    """Run argv in a new process; its peak RSS is the kernel's ru_maxrss for that child (KiB on Linux).

    Linux carries the parent's high-water mark into a child's ru_maxrss across fork and exec, so the
    driver must stay far smaller than what it measures: it never imports numpy, torch or onnxruntime.
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env={**os.environ, **(env or {})}, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return {"returncode": proc.returncode, "peak_mib": usage.ru_maxrss / 1024, "wall_s": wall,
                "stdout": out.read(), "stderr": err.read()}


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


MAKE_MODEL = r"""
import json, sys
from pathlib import Path
from patchgen.export.onnx_export import export_onnx
from patchgen.models.checkpoint import save_checkpoint
from patchgen.models.config import ModelConfig, TrainConfig
from patchgen.models.train import new_state, state_dict
path, config = Path(sys.argv[1]), json.loads(sys.argv[2])
config["channel_mults"] = tuple(config.get("channel_mults", (1, 2, 2)))
config["attention_resolutions"] = tuple(config.get("attention_resolutions", (8,)))
cfg, tc = ModelConfig(**config), TrainConfig()
ckpt = path.with_suffix(".pt")
save_checkpoint(ckpt, state_dict(new_state(cfg, tc), cfg, tc, {"name": "random weights"}))
export_onnx(ckpt, path, force=True)
ckpt.unlink()
"""


def random_model(path: Path, image_size: int, grid: int, **config) -> Path:
    """Export a random-weight patch model, in a child process (it needs torch; this process stays lean)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        config = {"image_size": image_size, "grid": grid, "use_position": grid > 1, "use_gcc": grid > 1, **config}
        subprocess.run(python("-c", MAKE_MODEL, str(path), json.dumps(config)), check=True)
    return path


def write_results(stem: Path, title: str, columns: list[tuple[str, str]], rows: list[dict], notes: str = "") -> None:
    """STEM.json (machine-readable) and STEM.md (a table); columns are (key, header) pairs."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"title": title, "machine": machine(), "rows": rows}, indent=1) + "\n")

    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) and abs(v) < 100 else (f"{v:.0f}" if isinstance(v, float) else str(v))
    lines = [f"# {title}", "", f"Machine: {machine()}", "", "| " + " | ".join(h for _, h in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    if notes:
        lines += ["", notes]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
