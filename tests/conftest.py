import re
import subprocess
import sys

import numpy as np
import pytest

from patchgen.models.cache import CACHE_ENV
from patchgen.models.config import ModelConfig, TrainConfig
from patchgen.models.data import DataSource, ImageSet


@pytest.fixture(autouse=True, scope="session")
def image_cache_in_tmp(tmp_path_factory):
    """patchgen's caches (default: ~/.cache/patchgen: the training image cache and the sampler's graph
    cache) go to a temporary folder, for the tests' own processes and the ones they start."""
    mp = pytest.MonkeyPatch()
    mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("patchgen-cache")))
    yield
    mp.undo()


def tiny_config(**overrides) -> ModelConfig:
    """A U-Net small enough to train for a few steps in a test (16x16 images, ~30k parameters)."""
    base = dict(image_size=16, grid=2, base_width=8, channel_mults=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), attention_heads=2)
    base.update(overrides)
    return ModelConfig(**base)


def blob_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Synthetic training images: a coloured disc on white, uint8 [N, H, W, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.full((n, size, size, 3), 255, np.uint8)
    for img in out:
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        r = rng.uniform(size * 0.2, size * 0.35)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.integers(0, 200, 3)
    return out


def blob_folder(root, n: int, size: int = 16):
    """`root` filled with n blob images as PNGs (000.png, 001.png, ...): a training folder. Returns root."""
    from PIL import Image

    for i, img in enumerate(blob_images(n, size)):
        Image.fromarray(img).save(root / f"{i:03d}.png")
    return root


@pytest.fixture
def blobs16() -> ImageSet:
    return ImageSet(blob_images(64, 16), DataSource("blobs", num_images=64))


@pytest.fixture
def tiny_train_config() -> TrainConfig:
    return TrainConfig(batch_size=8, lr=2e-3, warmup_steps=5)


def write_checkpoint(path, config: ModelConfig, step: int = 0, seed: int = 0, data: DataSource | None = None):
    """An untrained (random-weight) checkpoint for `config`, as patchgen-train writes them."""
    from patchgen.models.checkpoint import save_checkpoint
    from patchgen.models.train import new_state, state_dict

    train_config = TrainConfig(seed=seed)
    state = new_state(config, train_config)
    state.step = step
    data = data or DataSource("test-blobs", "made by the test", "CC0", num_train=1)
    save_checkpoint(path, state_dict(state, config, train_config, data))
    return path


# Run Python code with `import torch` failing, as on an edge device without torch.
BLOCK_TORCH = """
import sys
class _BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _BlockTorch())
"""


def sample_cli(*args, block_torch=False, timeout=300) -> subprocess.CompletedProcess:
    """Run patchgen-sample in a fresh interpreter (optionally with torch blocked)."""
    code = (BLOCK_TORCH if block_torch else "") + (
        "import runpy, sys\nsys.argv = ['patchgen-sample', *sys.argv[1:]]\n"
        "runpy.run_module('patchgen.cli.sample', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


# patchgen-sample in a fresh process that reports the kernel's high-water mark as it exits (the CLI's own
# "peak RSS" line is printed before PNGs are closed and the interpreter winds down).
REPORTING_PEAK = """
import atexit, runpy, sys
def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("\\nVmHWM " + line.split()[1] + " kB\\n")
atexit.register(report)
sys.argv = ["patchgen-sample", *sys.argv[1:]]
runpy.run_module("patchgen.cli.sample", run_name="__main__")
"""


def sample_peak(*args, timeout=300) -> tuple[subprocess.CompletedProcess, int]:
    """patchgen-sample in a fresh process: (the finished run, its peak RSS in bytes, VmHWM as it exits)."""
    r = subprocess.run([sys.executable, "-c", REPORTING_PEAK, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    return r, int(re.search(r"VmHWM (\d+) kB", r.stderr).group(1)) * 1024
