"""Compare the emulated aarch64 run of benchmarks/arm64_emulated.sh with the x86_64 one.

Usage (the shell script calls it): python benchmarks/arm64_compare.py OUT_DIR QEMU_CPU [RESULTS_STEM]
Prints one line per comparison; with RESULTS_STEM writes STEM.md and STEM.json. Exit code 1 when the
float images differ by more than TOLERANCE or the CLI's PNGs cannot be compared.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from benchlib import write_results
from patchgen.runtime.images import to_uint8

# onnxruntime's aarch64 kernels (NEON) and x86 ones (AVX2/AVX-512) sum in different orders: float32 rounding
# differs, by a few 1e-6 through 2 sampler steps of these models; 1e-4 is 25x that, and 1/40 of a uint8 level.
TOLERANCE = 1e-4


def cli_report(path: Path) -> dict:
    """s/image and peak RSS (MiB) from patchgen-sample's --report (cli/report.py); {} where it wrote none."""
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    return {"s_per_image": report["seconds"]["per_image"], "peak_mib": report["peak_rss_bytes"] / 2**20}


def main(out: Path, qemu_cpu: str, stem: Path | None) -> int:
    envs = {a: json.loads((out / f"{a}.json").read_text()) for a in ("x86", "arm64")}
    cli = {a: cli_report(out / f"{a}_report.json") for a in ("x86", "arm64")}
    x86_png, arm_png = out / "x86" / "seed0_00000.png", out / "arm64" / "seed0_00000.png"
    same_png = x86_png.is_file() and arm_png.is_file() and x86_png.read_bytes() == arm_png.read_bytes()
    a, b = np.load(out / "x86.npz"), np.load(out / "arm64.npz")
    rows = []
    for run in a.files:
        diff = np.abs(a[run].astype(np.float64) - b[run])
        to8 = [to_uint8(x) for x in (a[run], b[run])]  # the runtime's own rounding to PNG values
        rows.append({"run": run, "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                     "bit_exact": bool(np.array_equal(a[run], b[run])), "uint8_equal": bool(np.array_equal(*to8))})
    cli_row = {"run": "patchgen-sample (default model, ddim 2 steps): PNG bytes", "uint8_equal": same_png,
               "x86_s_per_image": cli["x86"].get("s_per_image"), "arm64_s_per_image": cli["arm64"].get("s_per_image"),
               "x86_peak_mib": cli["x86"].get("peak_mib"), "arm64_peak_mib": cli["arm64"].get("peak_mib")}
    worst = max(r["max_abs_diff"] for r in rows)
    ok = same_png and worst <= TOLERANCE
    for r in rows:
        print(f"{r['run']}: max |x86 - aarch64| = {r['max_abs_diff']:.3g} (mean {r['mean_abs_diff']:.2g}), "
              f"bit-exact {r['bit_exact']}, same uint8 {r['uint8_equal']}")
    print(f"PNG from patchgen-sample: {'identical bytes' if same_png else 'DIFFERENT'}; s/image x86 "
          f"{cli_row['x86_s_per_image']}, emulated aarch64 {cli_row['arm64_s_per_image']}")
    print(f"{'PASS' if ok else 'FAIL'}: worst float difference {worst:.3g} (tolerance {TOLERANCE:g})")
    if stem is not None:
        env = envs["arm64"]
        notes = (f"Emulated: qemu-user-static -cpu {qemu_cpu}, Debian bookworm arm64 Python {env['python']}, "
                 f"numpy {env['numpy']}, onnxruntime {env['onnxruntime']}, pillow {env['pillow']} (aarch64 wheels); "
                 f"the x86_64 run uses the same versions. Float images: `runtime.loop.sample_images`, seed 0, one "
                 f"image in [-1, 1], before rounding to uint8. Tolerance {TOLERANCE:g}. Emulated time and peak RSS (which "
                 f"includes qemu's own translation cache) say nothing "
                 f"about a real board. Reproduce: `benchmarks/arm64_emulated.sh --results benchmarks/results/arm64`.")
        columns = [("run", "run"), ("max_abs_diff", "max abs diff"), ("mean_abs_diff", "mean abs diff"),
                   ("bit_exact", "bit-exact"), ("uint8_equal", "same uint8 / PNG bytes"),
                   ("x86_s_per_image", "x86 s/image"), ("arm64_s_per_image", "emulated s/image"),
                   ("x86_peak_mib", "x86 peak MiB"), ("arm64_peak_mib", "emulated peak MiB")]
        write_results(stem, "patchgen on aarch64 (emulated) vs x86_64", columns, rows + [cli_row], notes)
    return 0 if ok else 1


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(Path(args[0]), args[1], Path(args[2]) if len(args) > 2 else None))
