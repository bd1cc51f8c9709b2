"""The shipped models: present as package data, complete metadata, deterministic samples, torch-free default."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from patchgen.runtime.generate import generate
from patchgen.runtime.metadata import spec_to_metadata
from patchgen.runtime.model import load_model
from patchgen.runtime.pretrained import DEFAULT_MODEL, pretrained_dir
from conftest import sample_cli

PRETRAINED = pretrained_dir()

TWEMOJI = ("twemoji-faces", "CC-BY-4.0", "Twemoji")  # data name, license, a word of the attribution
NOTO = ("noto-emoji-faces", "Apache-2.0 AND OFL-1.1", "Noto Color Emoji")
SHIPPED = {"faces64_2x2.onnx": (64, 2, TWEMOJI), "faces64_1x1.onnx": (64, 1, TWEMOJI),  # file -> size, grid, data
           "noto128_4x4.onnx": (128, 4, NOTO), "noto128_1x1.onnx": (128, 1, NOTO)}
# Each shipped model's 2 images from seed 5 (4 DPM++ steps): (mean pixel value, `fingerprint`). Same-seed output
# has been byte-identical on x86 and aarch64; the tolerance (GOLDEN_TOLERANCE) leaves room for a last-bit drift.
GOLDEN = {"faces64_2x2.onnx": (189.35, -84.31), "faces64_1x1.onnx": (188.74, -94.98),
          "noto128_4x4.onnx": (196.60, 19.66), "noto128_1x1.onnx": (195.77, -0.89)}
GOLDEN_TOLERANCE = 0.5  # pixel levels; another seed moves the fingerprint by 7 to 25
DESCRIPTIVE = ["version", "global_context", "model_config", "weights", "training.steps", "data.name",
               "data.num_train", "data.holdout_fraction", "data.holdout_seed", "data.attribution", "data.license",
               "opset"]


def fingerprint(images: np.ndarray) -> float:
    """A checksum that tolerates rounding: the images (uint8 [N, H, W, C]), less their mean, projected on fixed
    Gaussian weights and scaled by 1/sqrt(pixels). One level on one pixel moves it by about 0.005."""
    x = images.astype(np.float64)
    weights = np.random.default_rng(0).standard_normal(x.shape)
    return float(((x - x.mean()) * weights).sum() / np.sqrt(x.size))


@pytest.mark.quick
def test_shipped_files_fit_the_size_limit():
    sizes = {name: (PRETRAINED / name).stat().st_size for name in SHIPPED}
    assert sum(sizes.values()) <= 30e6, sizes


@pytest.mark.quick
def test_every_shipped_file_is_tested_and_the_default_is_shipped():
    assert sorted(p.name for p in PRETRAINED.glob("*.onnx")) == sorted(SHIPPED) == sorted(GOLDEN)
    assert f"{DEFAULT_MODEL}.onnx" in SHIPPED


@pytest.mark.parametrize("name,size,grid,data", [(name, *v) for name, v in SHIPPED.items()])
def test_shipped_model_loads_with_complete_metadata(name, size, grid, data):
    model = load_model(PRETRAINED / name)
    assert (model.spec.image_size, model.spec.grid) == (size, grid)
    meta = {p.key: p.value for p in onnx.load(PRETRAINED / name, load_external_data=False).metadata_props}
    before_halo = meta["patchgen.format_version"] == "1"  # format 1 files have no patchgen.halo: they read as 0
    required = [k for k in spec_to_metadata(model.spec) if not (before_halo and k == "patchgen.halo")]
    required += [f"patchgen.{k}" for k in DESCRIPTIVE]
    assert all(meta.get(k) for k in required), [k for k in required if not meta.get(k)]
    data_name, license_, credit = data
    assert meta["patchgen.data.name"] == data_name and meta["patchgen.data.license"] == license_
    assert credit in meta["patchgen.data.attribution"]
    assert meta["patchgen.weights"] == "ema" and int(meta["patchgen.training.steps"]) > 0


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_samples_deterministically(name):
    model = load_model(PRETRAINED / name)
    a = generate(model, num_images=2, seed=5, steps=4, sampler="dpm++")
    b = generate(model, num_images=2, seed=5, steps=4, sampler="dpm++", patch_batch=model.spec.grid ** 2 * 2)
    size = model.spec.image_size
    assert a.shape == (2, size, size, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert a.std() > 10  # an image, not a flat field
    got = (a.mean(), fingerprint(a))
    assert all(abs(g - pinned) <= GOLDEN_TOLERANCE for g, pinned in zip(got, GOLDEN[name])), (got, GOLDEN[name])


def test_default_model_runs_without_torch(tmp_path):
    r = sample_cli("-n", "1", "--steps", "3", "--out", tmp_path, block_torch=True)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.glob("*.png")] == ["seed0_00000.png"]


def test_shipped_model_by_name(tmp_path):
    r = sample_cli("--model", "faces64_1x1", "-n", "1", "--steps", "2", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("faces64_1x1.onnx on cpu: 64x64, 1x1 patches")


def test_api_takes_shipped_names():
    assert load_model().path.name == f"{DEFAULT_MODEL}.onnx"
    by_name = generate("faces64_2x2", num_images=1, seed=3, steps=2, sampler="dpm++")
    np.testing.assert_array_equal(by_name, generate(PRETRAINED / "faces64_2x2.onnx", 1, seed=3, steps=2,
                                                    sampler="dpm++"))
