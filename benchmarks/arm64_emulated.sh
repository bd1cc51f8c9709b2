#!/bin/sh
# patchgen's edge path (numpy + onnxruntime + pillow + click, no torch) under an emulated aarch64 CPython,
# compared with the same run on this x86_64 machine: the PNG bytes of `patchgen-sample`, and the float
# images of the sampler before rounding. Debian bookworm's arm64 python3.11 runs under qemu-user-static
# (called directly, no binfmt_misc), with the aarch64 wheels of the versions pinned in constraints.txt.
#
#   benchmarks/arm64_emulated.sh                          # set up (cached), compare, print the table
#   benchmarks/arm64_emulated.sh --results benchmarks/results/arm64   # ... and write arm64.md and .json
#   benchmarks/arm64_emulated.sh py -m patchgen.cli.sample --help    # the emulated python itself
#
# Needs: root (apt-get download into a private apt state; `unshare -m` + `mount --bind` for /proc/cpuinfo),
# qemu-user-static (installed with apt-get when missing), and the Debian and PyPI registries.
# onnxruntime's cpuinfo probe crashes under emulation on the host's x86 /proc/cpuinfo, so a Raspberry Pi 4
# (Cortex-A72) one is bind-mounted inside a private mount namespace; qemu emulates that core (-cpu cortex-a72;
# QEMU_CPU=max enables dotprod/fp16/SVE, and onnxruntime then picks other kernels).
# Everything is cached under $CACHE (about 360 MB; 90 s from scratch on the 2-core CI machine). The
# checkout is only read: patchgen is imported through a tree of symlinks, never built in place.
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/patchgen-arm64}
X86_PY=${X86_PY:-python3}   # the x86_64 interpreter with patchgen installed (the test passes its own)
QEMU_CPU=${QEMU_CPU:-cortex-a72}
PYV=3.11 ABI=cp311          # bookworm's python3.11
PINS=$(grep -iE '^(numpy|onnxruntime|pillow|click)==' "$REPO/constraints.txt" | tr '\n' ' ')
SYSROOT=$CACHE/sysroot SITE=$CACHE/site PKGROOT=$CACHE/pkgroot A=$CACHE/apt
RESULTS=
if [ "${1:-}" = --results ]; then RESULTS=$(realpath -m "$2"); shift 2; fi
mkdir -p "$CACHE"

# 1. qemu-user-static
if ! command -v qemu-aarch64-static >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null
fi

# 2. An arm64 sysroot from Debian's packages, through a private apt configuration: the host's dpkg
#    architectures, package lists and installed packages are not touched.
if [ ! -e "$SYSROOT/.done" ]; then
  mkdir -p "$A/lists/partial" "$A/archives/partial" "$A/etc/sources.list.d" "$A/etc/preferences.d" \
           "$A/etc/apt.conf.d" "$A/debs"
  : > "$A/status"
  for s in "debian bookworm" "debian bookworm-updates" "debian-security bookworm-security"; do set -- $s
    echo "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/$1 $2 main"
  done > "$A/etc/sources.list"
  cat > "$A/apt.conf" <<CONF
APT::Architecture "arm64"; APT::Architectures { "arm64"; };
Dir::State "$A"; Dir::State::Lists "$A/lists"; Dir::State::status "$A/status";
Dir::Cache "$A"; Dir::Cache::archives "$A/archives";
Dir::Etc::SourceList "$A/etc/sources.list"; Dir::Etc::SourceParts "$A/etc/sources.list.d";
Dir::Etc::Preferences "$A/etc/preferences"; Dir::Etc::PreferencesParts "$A/etc/preferences.d";
Dir::Etc::Parts "$A/etc/apt.conf.d"; APT::Sandbox::User "root";
CONF
  export APT_CONFIG="$A/apt.conf"
  apt-get update -qq
  # python3.11 and what it needs at run time; not dpkg, perl or the mime tables (install-time only)
  PKGS=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
           --no-enhances "python$PYV-minimal" "libpython$PYV-stdlib" libstdc++6 | grep -v '^[ <]' | sort -u |
         grep -vE '^(dpkg|tar|install-info|perl|perl-base|perl-modules-.*|libperl.*|libgdbm-compat4|mailcap|mime-support)$')
  (cd "$A/debs" && apt-get download -qq $PKGS)
  unset APT_CONFIG
  rm -rf "$SYSROOT" && mkdir -p "$SYSROOT"
  for d in "$A"/debs/*.deb; do dpkg -x "$d" "$SYSROOT"; done
  rm -rf "$A/lists"  # 170 MB of package lists, needed only for the download
  touch "$SYSROOT/.done"
fi

# 3. The aarch64 wheels (numpy >= 2.3 and pillow 13 are manylinux_2_28 only: both platform tags are listed)
if [ ! -e "$SITE/.done" ]; then
  PLAT="--platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --only-binary=:all: --python-version $PYV --implementation cp --abi $ABI"
  "$X86_PY" -m pip download -q $PLAT -d "$CACHE/wheels" $PINS 2>&1 | grep -v "is ignored" || true
  rm -rf "$SITE"
  "$X86_PY" -m pip install -q --no-index --find-links "$CACHE/wheels" --target "$SITE" $PLAT $PINS
  touch "$SITE/.done"
fi

# 4. patchgen as a namespace of symlinks to the checkout (the package-dir mapping of pyproject.toml)
mkdir -p "$PKGROOT/patchgen"
for d in runtime cli models export; do ln -sfn "$REPO/$d" "$PKGROOT/patchgen/$d"; done

# 5. A Raspberry Pi 4's /proc/cpuinfo (4 Cortex-A72 cores)
if [ ! -e "$CACHE/cpuinfo" ]; then
  for i in 0 1 2 3; do
    printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' $i
  done > "$CACHE/cpuinfo"
  printf 'Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n' >> "$CACHE/cpuinfo"
fi

arm_py() {  # the emulated python; the bind mount exists only inside this private mount namespace
  PYTHONPATH="$SITE:$PKGROOT" PYTHONDONTWRITEBYTECODE=1 unshare -m sh -c \
    'mount --bind "$0" /proc/cpuinfo && cpu=$1 root=$2 && shift 2 && exec qemu-aarch64-static -cpu "$cpu" -L "$root" "$root/usr/bin/python'$PYV'" "$@"' \
    "$CACHE/cpuinfo" "$QEMU_CPU" "$SYSROOT" "$@"
}
x86_py() { (cd /tmp && env -u PYTHONPATH "$X86_PY" "$@"); }
# patchgen's distribution metadata beside the symlinks, as an install has it: the PNGs record the version
VERSION=$(x86_py -c 'import importlib.metadata as m; print(m.version("patchgen"))')
rm -rf "$PKGROOT"/patchgen-*.dist-info && mkdir -p "$PKGROOT/patchgen-$VERSION.dist-info"
printf 'Metadata-Version: 2.1\nName: patchgen\nVersion: %s\n' "$VERSION" > "$PKGROOT/patchgen-$VERSION.dist-info/METADATA"

if [ "${1:-}" = py ]; then shift; arm_py "$@"; exit; fi

OUT=$CACHE/out
rm -rf "$OUT" && mkdir -p "$OUT"
# The default model, 1 image, 2 DDIM steps: emulation is about 100x slower than this CPU
SAMPLE="-m patchgen.cli.sample -n 1 --steps 2 --threads 1 --out"
x86_py $SAMPLE "$OUT/x86" --report "$OUT/x86_report.json" 2> "$OUT/x86.log"
arm_py $SAMPLE "$OUT/arm64" --report "$OUT/arm64_report.json" 2> "$OUT/arm64.log"
cat > "$OUT/sample_floats.py" <<'PY'
import json, platform, sys
import numpy as np, onnxruntime, PIL
from patchgen.runtime.loop import sample_images
from patchgen.runtime.model import load_model
out = {}
for run in sys.argv[2:]:  # model:sampler:steps
    name, sampler, steps = run.split(":")
    m = load_model(name, threads=1)
    out[run] = sample_images(m, m.spec, num_images=1, seed=0, steps=int(steps), sampler=sampler)
np.savez(sys.argv[1], **out)
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
                  "onnxruntime": onnxruntime.__version__, "pillow": PIL.__version__}))
PY
RUNS="faces64_2x2:ddim:2 faces64_2x2:dpm++:2 faces64_1x1:ddim:2"
x86_py "$OUT/sample_floats.py" "$OUT/x86.npz" $RUNS > "$OUT/x86.json"
arm_py "$OUT/sample_floats.py" "$OUT/arm64.npz" $RUNS > "$OUT/arm64.json"
x86_py "$REPO/benchmarks/arm64_compare.py" "$OUT" "$QEMU_CPU" ${RESULTS:+"$RESULTS"}
