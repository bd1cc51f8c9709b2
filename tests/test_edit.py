"""Editing on the device: img2img, inpainting (only the painted patches make calls), outpainting, the live
preview, the `parameters` text and the pinned noise stream. Torch-free, like the runtime it tests."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import sample_cli, sample_peak
from patchgen.runtime.edit import Edit, make_edit
from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.generate import generate, sampling_request
from patchgen.runtime.images import to_uint8
from patchgen.runtime.loop import SAMPLERS, edit_timesteps, sample_images
from patchgen.runtime.memory import MIB, parse_size
from patchgen.runtime.model import load_model
from patchgen.runtime.samplers import image_rngs, normal_like
from patchgen.runtime.schedule import Schedule, alphas_cumprod
from patchgen.runtime.spec import ModelSpec

HALO_SPEC = ModelSpec(image_size=16, channels=3, grid=4, use_position=True, use_gcc=True, halo=2,
                      schedule=Schedule("cosine", 100))


class CountingNet:
    """A deterministic stand-in for the ONNX network: eps from the window's centre and the GCC, so that kept
    pixels, halos and GCC all reach the output; counts calls and patches."""

    def __init__(self, spec: ModelSpec):
        self.spec, self.calls, self.patches = spec, 0, 0

    def __call__(self, x, t, pos, gcc):
        self.calls += 1
        self.patches += len(x)
        m = self.spec.halo
        centre = x[:, :, m:x.shape[2] - m, m:x.shape[3] - m]
        return np.tanh(0.5 * centre + 0.1 * (gcc if gcc is not None else 0) + 0.01 * t[:, None, None, None])


def random_image(spec: ModelSpec, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (spec.image_size, spec.image_size, spec.channels),
                                                dtype=np.uint8)


def as_init(image: np.ndarray) -> np.ndarray:
    return make_edit(HALO_SPEC, image)[0].init


@pytest.mark.quick
def test_no_sampler_is_dpmpp_unless_what_is_asked_needs_ddim():
    """dpm++ 20 by default; DDIM's eta, or RePaint's jumps (which dpm++'s multistep update cannot take), choose
    ddim 50 instead, and a sampler given is kept (dpm++ with jumps is then refused, as before)."""
    init = np.zeros(HALO_SPEC.image_shape, np.float32)
    keep = np.ones((16, 16), bool)
    keep[:4, :4] = False
    jumps = Edit(init, keep, jumps=2)
    chosen = [(r.sampler, r.steps, r.eta) for r in (sampling_request(HALO_SPEC), sampling_request(HALO_SPEC, eta=0.5),
                                                    sampling_request(HALO_SPEC, edit=jumps),
                                                    sampling_request(HALO_SPEC, edit=Edit(init, keep)),
                                                    sampling_request(HALO_SPEC, sampler="ddim"))]
    assert chosen == [("dpm++", 20, None), ("ddim", 50, 0.5), ("ddim", 50, 0.0), ("dpm++", 20, None), ("ddim", 50, 0.0)]
    with pytest.raises(PatchgenError, match="repaint_jumps needs the ddim or ddpm sampler"):
        sampling_request(HALO_SPEC, sampler="dpm++", edit=jumps)


@pytest.mark.quick
def test_noise_stream_is_pinned():
    """The first noise values of (seed 0, image 0) and (seed 2^32 - 1, image 5), as float32 bits. numpy does
    not promise its streams across versions: when this fails, every seed's image has changed."""
    first = normal_like(image_rngs(0, 0, 1), (1, 2, 4))[0].ravel().view(np.uint32)
    last = normal_like(image_rngs(2**32 - 1, 5, 1), (1, 2, 4))[0].ravel().view(np.uint32)
    assert [hex(v) for v in first] == ["0x3f8f0e3d", "0xbfb18d4f", "0xbeda6798", "0xbf4db7e5", "0x3f19f72b",
                                       "0xbd99960f", "0x3d7480da", "0xbd0318d1"]
    assert [hex(v) for v in last] == ["0xbf456f8c", "0x3f240e7c", "0x3e2056b2", "0xbf99aecc", "0x3f1866b2",
                                      "0x3e2423a0", "0xbf6e2b1a", "0xbf9dbe55"]


@pytest.mark.parametrize("steps,strength,run", [(50, 1.0, 50), (50, 0.3, 15), (50, 0.75, 37), (10, 0.7, 7),
                                                (100, 0.29, 29), (50, 0.019, 0), (1, 1e-9, 0)])
def test_strength_runs_the_last_floor_of_the_steps(steps, strength, run):
    timesteps = np.arange(steps)[::-1]
    assert list(edit_timesteps(timesteps, strength)) == list(timesteps[steps - run:])


@pytest.mark.quick
def test_strength_near_zero_leaves_the_image():
    net, image = CountingNet(HALO_SPEC), random_image(HALO_SPEC)
    x = sample_images(net, HALO_SPEC, num_images=2, seed=0, steps=50, init=as_init(image), strength=0.01)
    assert (to_uint8(x) == image).all() and net.calls == 0
    x = sample_images(net, HALO_SPEC, num_images=1, seed=0, steps=50, init=as_init(image), strength=0.02)
    assert net.calls == HALO_SPEC.grid**2  # one step, every patch


def test_img2img_starts_from_the_noised_input():
    """At strength 1 the first step sees sqrt(abar_T) init + sqrt(1 - abar_T) eps, eps the image's own x_T."""
    seen = []

    def net(x, t, pos, gcc):
        seen.append(x.copy())
        return np.zeros((len(x), 3, 4, 4), np.float32)

    image = random_image(HALO_SPEC)
    sample_images(net, HALO_SPEC, num_images=1, seed=3, steps=1, init=as_init(image), patch_batch=16)
    abar = alphas_cumprod(HALO_SPEC.schedule)[-1]
    eps = normal_like(image_rngs(3, 0, 1), HALO_SPEC.image_shape)
    x_t = math.sqrt(abar) * as_init(image)[None] + math.sqrt(1 - abar) * eps
    np.testing.assert_allclose(seen[0][0, :, 2:6, 2:6], x_t[0, :, :4, :4], atol=1e-6)  # patch (0, 0), halo 2


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_kept_pixels_are_the_inputs_bytes_and_calls_follow_the_mask(sampler):
    """Every sampler on a halo model with position and GCC: kept pixels come out as the input's 8-bit values,
    and each step calls the network for the patches with a painted pixel only (3 of 16 here)."""
    net, image = CountingNet(HALO_SPEC), random_image(HALO_SPEC, 1)
    paint = np.zeros((16, 16), bool)
    paint[0:2, 0:2] = True  # patch (0, 0)
    paint[5, 9] = True  # patch (1, 2): one pixel
    paint[15, 15] = True  # patch (3, 3)
    steps = 1000 if sampler == "ddpm" else 7
    steps = min(steps, HALO_SPEC.schedule.num_timesteps)
    x = sample_images(net, HALO_SPEC, num_images=3, seed=0, steps=steps, sampler=sampler, init=as_init(image),
                      keep=~paint)
    out = to_uint8(x)
    assert (out[:, ~paint] == image[~paint]).all()
    assert (out[:, paint] != image[paint]).any()
    assert net.patches == net.calls == steps * 3 * 3  # patch batch 1: one call per painted patch


def test_calls_batch_painted_patches_across_images():
    net = CountingNet(HALO_SPEC)
    paint = np.zeros((16, 16), bool)
    paint[:4, :8] = True  # patches (0, 0) and (0, 1)
    sample_images(net, HALO_SPEC, num_images=4, seed=0, steps=2, init=as_init(random_image(HALO_SPEC)),
                  keep=~paint, patch_batch=8)
    assert net.patches == 2 * 4 * 2 and net.calls == 2  # 8 painted patches per step: one call


def test_a_1x1_model_makes_one_call_per_step():
    spec = ModelSpec(image_size=8, channels=1, grid=1, use_position=False, use_gcc=False,
                     schedule=Schedule("linear", 50))
    net = CountingNet(spec)
    image = random_image(spec)
    paint = np.zeros((8, 8), bool)
    paint[3, 3] = True
    init, keep = make_edit(spec, image, paint)[0].init, ~paint
    x = sample_images(net, spec, num_images=1, seed=0, steps=5, init=init, keep=keep)
    assert net.calls == 5 and (to_uint8(x)[0][keep] == image[keep]).all()


def gaussian_denoiser(cov: np.ndarray, abar: np.ndarray):
    """The exact eps network of a zero-mean Gaussian data set with covariance `cov` on a 2x2 one-channel
    image: E[x0 | x_t] = cov a (a^2 cov + (1 - a^2) I)^-1 x_t, a = sqrt(abar_t)."""
    def net(x, t, pos, gcc):
        a2 = float(abar[int(t[0])])
        xt = x.reshape(len(x), 4).astype(np.float64)
        x0 = (cov @ np.linalg.solve(a2 * cov + (1 - a2) * np.eye(4), math.sqrt(a2) * xt.T)).T
        return ((xt - math.sqrt(a2) * x0) / math.sqrt(1 - a2)).reshape(x.shape).astype(np.float32)
    return net


def test_inpainting_against_the_exact_posterior():
    """Four pixels, jointly Gaussian (std 0.2, correlation 0.9), with the exact denoiser; pixel (0, 0) kept
    at 0.3. The posterior of each painted pixel is N(0.27, 0.087^2). Replacement alone (every sampler) lands
    short of that mean, as RePaint (Lugmayr et al. 2022) reports of it; RePaint's resampling closes most
    of the gap. Measured (4000 images, ddpm 100 steps): mean 0.13 with no jump, 0.23 with 4, 0.25 with 19."""
    spec = ModelSpec(image_size=2, channels=1, grid=1, use_position=False, use_gcc=False,
                     schedule=Schedule("linear", 1000))
    s, rho = 0.2, 0.9
    cov = s * s * (rho * np.ones((4, 4)) + (1 - rho) * np.eye(4))
    net = gaussian_denoiser(cov, alphas_cumprod(spec.schedule))
    init = np.full((1, 2, 2), 0.3, np.float32)
    keep = np.zeros((2, 2), bool)
    keep[0, 0] = True
    target = rho * 0.3

    def painted_mean(jumps):
        x = sample_images(net, spec, num_images=2000, seed=1, steps=100, sampler="ddpm", init=init, keep=keep,
                          patch_batch=2000, jumps=jumps)
        assert (x[:, 0, 0, 0] == np.float32(0.3)).all()
        return float(x.reshape(-1, 4)[:, 1:].mean())

    plain, resampled = painted_mean(0), painted_mean(4)
    assert 0.3 * target < plain < 0.7 * target  # replacement: biased towards the prior's mean, 0
    assert resampled > plain + 0.05 and abs(resampled - target) < 0.5 * abs(plain - target)


def test_outpainting_keeps_the_shifted_part():
    model = load_model("faces64_2x2", threads=1)
    image = generate(model, 1, seed=3, steps=3, memory_budget="min")[0]
    for side, moved in (("right", lambda o: (o[:, :32], image[:, 32:])), ("left", lambda o: (o[:, 32:], image[:, :32])),
                        ("down", lambda o: (o[:32], image[32:])), ("up", lambda o: (o[32:], image[:32]))):
        out = generate(model, 2, seed=1, steps=3, memory_budget="min", init_image=image, outpaint=f"{side}:1")
        for o in out:
            kept, source = moved(o)
            assert (kept == source).all(), side


@pytest.fixture
def edit_files(tmp_path):
    model = load_model("faces64_2x2", threads=1)
    image = generate(model, 1, seed=3, steps=3, memory_budget="min")[0]
    Image.fromarray(image).save(tmp_path / "face.png")
    Image.fromarray(image).resize((100, 80)).save(tmp_path / "face_wide.jpg")
    mask = np.zeros((64, 64), np.uint8)
    mask[40:60, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "black.png")
    (tmp_path / "noise.png").write_bytes(b"not a png at all")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "face.png").read_bytes()[:200])  # a header that lies
    Image.new("L", (30000, 30000)).save(tmp_path / "huge.png")  # 900 MP of zeros: a few KiB on disk
    Image.new("L", (5000, 5000)).save(tmp_path / "large.png")  # 25 MP: over what a 64x64 model decodes
    Image.fromarray(mask[:, :48]).save(tmp_path / "narrow_mask.png")  # neither the image's size nor square
    (tmp_path / "new\nline.png").write_bytes((tmp_path / "face.png").read_bytes()[:200])
    return tmp_path, image, mask > 127


def test_cli_inpaint_preview_and_parameters_without_torch(edit_files):
    """With torch blocked: inpainting with a preview of the grid; the finals are byte-identical to a run
    without --preview, the preview is a valid PNG of the finished grid, each PNG has a `parameters` line."""
    tmp, image, paint = edit_files
    common = ("--init-img", tmp / "face.png", "--mask", tmp / "mask.png", "-n", "3", "--steps", "4",
              "--sampler", "dpm++", "--memory-budget", "min")
    r = sample_cli(*common, "--out", tmp / "a", "--grid-image", tmp / "a.png", "--preview", tmp / "live.png",
                   "--preview-every", "3", block_torch=True)
    assert r.returncode == 0, r.stderr
    assert "inpainting at strength 1: 4 of 4 steps, 1 of 4 patches painted" in r.stderr
    r = sample_cli(*common, "--out", tmp / "b", "--grid-image", tmp / "b.png")
    assert r.returncode == 0, r.stderr
    for name in ("seed0_00000.png", "seed0_00001.png", "seed0_00002.png"):
        assert (tmp / "a" / name).read_bytes() == (tmp / "b" / name).read_bytes()
        out = np.asarray(Image.open(tmp / "a" / name))
        assert (out[~paint] == image[~paint]).all()
    with Image.open(tmp / "live.png") as live, Image.open(tmp / "a.png") as grid:
        live.verify()
    with Image.open(tmp / "live.png") as live, Image.open(tmp / "a.png") as grid:
        assert live.text["patchgen:step"] == "4" and np.array_equal(np.asarray(live), np.asarray(grid))
    with Image.open(tmp / "a" / "seed0_00001.png") as png:
        assert re.fullmatch(r"Steps: 4, Sampler: DPM\+\+ 2M, Seed: 0, Image index: 1, Size: 64x64, "
                            r"Model: faces64_2x2, Model hash: [0-9a-f]{10}, Denoising strength: 1, Mask: yes, "
                            r"Version: patchgen \S+", png.text["parameters"]), png.text["parameters"]
        assert png.text["patchgen:edit"] == "inpainting"


def test_cli_img2img_notes_the_resize(edit_files):
    tmp, _, _ = edit_files
    r = sample_cli("--init-img", tmp / "face_wide.jpg", "--strength", "0.5", "-n", "1", "--steps", "4",
                   "--memory-budget", "min", "--out", tmp / "o", "--preview", tmp / "p_resize.png")
    assert r.returncode == 0, r.stderr
    assert "note: --init-img" in r.stderr and "is 100x80: centre-cropped and resized to 64x64" in r.stderr
    assert "img2img at strength 0.5: 2 of 4 steps" in r.stderr
    with Image.open(tmp / "o" / "seed0_00000.png") as png:
        assert "Denoising strength: 0.5" in png.text["parameters"] and "Mask" not in png.text["parameters"]


@pytest.mark.parametrize("args,message", [
    (("--mask", "{tmp}/mask.png"), "--mask needs --init-img, the image to edit"),
    (("--strength", "0.5"), "--strength needs --init-img"),
    (("--outpaint", "right:1"), "--outpaint needs --init-img"),
    (("--init-img", "{tmp}/face.png", "--strength", "0"), "--strength must be above 0 and at most 1, got 0.0"),
    (("--init-img", "{tmp}/face.png", "--strength", "1.5"), "--strength must be above 0 and at most 1, got 1.5"),
    (("--init-img", "{tmp}/face.png", "--strength", "nan"), "--strength must be above 0 and at most 1, got nan"),
    (("--init-img", "{tmp}/missing.png"), "--init-img {tmp}/missing.png: no such file"),
    (("--init-img", "{tmp}"), "--init-img {tmp} is a folder; give an image file"),
    (("--init-img", "{tmp}/noise.png"), "cannot read --init-img {tmp}/noise.png (cannot identify image file"),
    (("--init-img", "{tmp}/truncated.png"), "cannot read --init-img {tmp}/truncated.png"),
    (("--init-img", "{tmp}/huge.png"), "--init-img {tmp}/huge.png has more pixels than Pillow will decode"),
    (("--init-img", "{tmp}/large.png"), "--init-img {tmp}/large.png is 5000x5000, over the 16777216 pixels"),
    (("--init-img", "{tmp}/face.png", "--mask", "{tmp}/noise.png"), "cannot read --mask {tmp}/noise.png"),
    (("--init-img", "{tmp}/face.png", "--mask", "{tmp}/huge.png"), "--mask {tmp}/huge.png has more pixels than Pillow will decode"),
    (("--init-img", "{tmp}/face.png", "--mask", "{tmp}/black.png"),
     "--mask {tmp}/black.png keeps every pixel (none is white): nothing to paint"),
    (("--init-img", "{tmp}/face.png", "--outpaint", "right:2"),
     "--outpaint right:2 would shift the image off this 2x2 grid; K must be 1"),
    (("--init-img", "{tmp}/face.png", "--outpaint", "sideways"), "cannot read --outpaint 'sideways'"),
    (("--init-img", "{tmp}/face.png", "--outpaint", "up:1", "--mask", "{tmp}/mask.png"),
     "give --mask or --outpaint, not both"),
    (("--init-img", "{tmp}/face.png", "--repaint-jumps", "2"), "--repaint-jumps resamples around kept pixels"),
    (("--init-img", "{tmp}/face.png", "--mask", "{tmp}/mask.png", "--repaint-jumps", "2", "--sampler", "dpm++"),
     "--repaint-jumps needs the ddim or ddpm sampler"),
    (("--preview-every", "2"), "--preview-every needs --preview"),
    (("--init-img", "{tmp}/face.png", "--mask", "{tmp}/mask.png", "--preview", "{tmp}/mask.png"),
     "--preview {tmp}/mask.png is the --mask, which it would overwrite"),
    (("--init-img", "{tmp}/face.png", "--mask", "{tmp}/mask.png", "--grid-image", "{tmp}/mask.png"),
     "--grid-image {tmp}/mask.png is the --mask, which it would overwrite"),
    (("--init-img", "{tmp}/out/seed0_00000.png"), "--init-img {tmp}/out/seed0_00000.png is one of the PNGs this run"),
    (("--init-img", "{tmp}/face.png", "--outpaint", "left:1", "--strength", "0.5"),
     "--outpaint paints patches that start from nothing, so it runs every step: drop --strength 0.5"),
    (("--init-img", "{tmp}/face.png", "--mask", "{tmp}/narrow_mask.png"),
     "--mask {tmp}/narrow_mask.png is 48x64: give it the --init-img's size (64x64) or a square one"),
    (("--init-img", "{tmp}/new\nline.png"), "cannot read --init-img {tmp}/new\\nline.png"),
    (("--init-img", "{tmp}/face.png", "--mask", "{tmp}/mask.png", "--repaint-jumps", "101"),
     "Invalid value for '--repaint-jumps': 101 is not in the range 0<=x<=100"),
    (("--init-img", "{tmp}/face.png", "--preview", "{tmp}/face.png"), "--preview {tmp}/face.png is the --init-img"),
])
def test_bad_edit_input_is_one_line_and_creates_nothing(edit_files, args, message):
    tmp, _, _ = edit_files
    args = [a.format(tmp=tmp) for a in args]
    r = sample_cli(*args, "--out", tmp / "out", "--steps", "2", "--memory-budget", "min")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message.format(tmp=tmp) in lines[0], r.stderr
    assert not (tmp / "out").exists()


@pytest.mark.quick
@pytest.mark.parametrize("kwargs,message", [
    ({"mask": np.ones((32, 32), bool)}, r"^mask must be \[64, 64\] or \[64, 64, 1 to 4\]"),
    ({"mask": np.ones((64, 64, 0), bool)}, r"^mask must be \[64, 64\] or \[64, 64, 1 to 4\]"),
    ({"mask": np.full((64, 64), "a")}, r"^mask must hold bool or numbers, not <U1"),
    ({"mask": np.zeros((64, 64), bool)}, r"^mask keeps every pixel \(none is white\)"),
    ({"strength": "0.5"}, r"^strength must be a number, not '0.5'"),
    ({"outpaint": 1}, r"^outpaint must be text such as right:1, not int"),
    ({"outpaint": "right:1", "repaint_jumps": 1.5}, r"^repaint_jumps must be a whole number, not 1.5"),
    ({"init_image": [1, 2]}, r"^init_image must be a file's path, a PIL image or a uint8 array, not list"),
    ({"init_image": np.zeros((64, 64), np.uint8)}, r"^init_image must be uint8 \[64, 64, 3\] for this model"),
])
def test_api_refuses_bad_edit_arguments(kwargs, message):
    kwargs = {"init_image": np.zeros((64, 64, 3), np.uint8), **kwargs}
    with pytest.raises(PatchgenError, match=message):
        generate("faces64_2x2", steps=1, memory_budget="min", **kwargs)


SPEC_2X2 = ModelSpec(image_size=64, channels=3, grid=2, use_position=True, use_gcc=True,
                     schedule=Schedule("cosine", 100))


@pytest.mark.quick
@pytest.mark.parametrize("kwargs,library,cli", [
    ({"mask": "m.png"}, "mask needs init_image, the image to edit", "--mask needs --init-img, the image to edit"),
    ({"repaint_jumps": 2}, "repaint_jumps needs init_image", "--repaint-jumps needs --init-img"),
    ({"init_image": "{missing}.png"}, "init_image='{missing}.png': no such file",
     "--init-img {missing}.png: no such file"),
    ({"init_image": "i.png", "outpaint": "left:1", "strength": 0.5},
     "outpaint paints patches that start from nothing, so it runs every step: drop strength=0.5",
     "--outpaint paints patches that start from nothing, so it runs every step: drop --strength 0.5"),
    ({"init_image": "i.png", "outpaint": "right:2"}, "outpaint='right:2' would shift the image off this 2x2 grid",
     "--outpaint right:2 would shift the image off this 2x2 grid"),
    ({"init_image": "i.png", "mask": "m.png", "outpaint": "up:1"},
     "give mask or outpaint, not both: outpaint makes its own mask",
     "give --mask or --outpaint, not both: --outpaint makes its own mask"),
])
def test_edit_errors_name_arguments_and_the_cli_words_them_as_options(kwargs, library, cli):
    """The library says generate()'s arguments, never a flag; the CLI (`as_option`) says the same as flags."""
    from patchgen.cli.common import as_option

    with pytest.raises(PatchgenError) as e:
        make_edit(SPEC_2X2, **kwargs)
    assert "--" not in str(e.value) and str(e.value).startswith(library), str(e.value)
    assert e.value.worded(as_option).startswith(cli), e.value.worded(as_option)


@pytest.mark.quick
def test_edit_notes_name_the_argument(tmp_path):
    """make_edit's note on a resized input: init_image in the library's words, --init-img in the CLI's."""
    from patchgen.cli.common import as_option

    Image.fromarray(random_image(SPEC_2X2)).resize((100, 80)).save(tmp_path / "wide.png")
    _, notes = make_edit(SPEC_2X2, tmp_path / "wide.png")
    assert [str(n) for n in notes] == [f"init_image={str(tmp_path / 'wide.png')!r} is 100x80: centre-cropped and "
                                       "resized to 64x64"]
    assert [n.worded(as_option) for n in notes] == [f"--init-img {tmp_path / 'wide.png'} is 100x80: centre-cropped "
                                                    "and resized to 64x64"]


def test_mask_arrays_read_as_mask_files_do(edit_files):
    """One threshold for arrays and files: half of the dtype's white, luma for colour (not the brightest
    channel), so pure red (luma 0.3) is kept in both."""
    from patchgen.runtime.edit import read_mask

    tmp, _, paint = edit_files
    red = np.zeros((64, 64, 3), np.uint8)
    red[paint] = (200, 0, 0)
    red[:8, :8] = 255
    Image.fromarray(red).save(tmp / "red.png")
    from_file = read_mask(str(tmp / "red.png"), 64, (64, 64))
    assert from_file.sum() == 64 and (read_mask(red, 64, (64, 64)) == from_file).all()
    grey16 = np.where(paint, 65535, 1000).astype(np.uint16)
    grey32 = np.where(paint, 255, 100).astype(np.int32)
    assert (read_mask(grey16, 64, (64, 64)) == paint).all()
    assert not read_mask(grey32, 64, (64, 64)).any()  # int32's white is 2^31 - 1
    assert (read_mask(paint.astype(np.float32), 64, (64, 64)) == paint).all()


def test_api_takes_a_pil_image(edit_files):
    tmp, image, paint = edit_files
    with Image.open(tmp / "face.png") as img:
        out = generate("faces64_2x2", 1, steps=2, memory_budget="min", init_image=img, mask=paint)[0]
    assert (out[~paint] == image[~paint]).all()


def test_a_preview_that_cannot_be_written_costs_no_image(edit_files, monkeypatch):
    """A full disk where the preview goes: one note, previews stop, the images are written."""
    from click.testing import CliRunner

    import patchgen.runtime.images as images
    from patchgen.cli.sample import main

    tmp, _, _ = edit_files
    real = images.save_png

    def save_png(path, image, text=None):
        if Path(path).name == "live.png":
            raise OSError(28, "No space left on device", str(path))
        real(path, image, text)

    monkeypatch.setattr(images, "save_png", save_png)
    r = CliRunner().invoke(main, ["--init-img", str(tmp / "face.png"), "--strength", "0.5", "-n", "2", "--steps", "4",
                                  "--memory-budget", "min", "--out", str(tmp / "o"), "--preview", str(tmp / "live.png")])
    assert r.exit_code == 0, r.output
    assert r.output.count("note: no more previews:") == 1 and "No space left on device" in r.output
    assert len(list((tmp / "o").glob("*.png"))) == 2 and not (tmp / "live.png").exists()


def test_inpainting_keeps_its_budget_in_a_fresh_process(edit_files):
    """At the minimum an inpainting run with a preview is refused with, and above it, the kernel's peak
    stays within the budget."""
    tmp, _, _ = edit_files
    args = ("--init-img", tmp / "face.png", "--mask", tmp / "mask.png", "-n", "2", "--steps", "3",
            "--grid-image", tmp / "g.png", "--preview", tmp / "p.png", "--force")  # the budgets below take turns
    budget, refusals = "1M", []
    while True:  # each refusal names a budget to try: the weights, decoding the input, then the run's calls
        r, _ = sample_peak(*args, "--memory-budget", budget, "--out", tmp / "x")
        refusals.append(r.stderr)
        assert r.returncode == 2 and not (tmp / "x").exists(), refusals
        found = re.search(r"minimum of (\d+\.\d)M \(one patch per call\)", r.stderr)
        if found:
            break
        budget = re.search(r"pass --memory-budget (\d+M) or more", r.stderr).group(1)
        assert len(refusals) < 4, refusals
    assert any("decoding --init-img" in e for e in refusals), refusals
    for budget in (f"{found.group(1)}M", f"{float(found.group(1)) + 32:.1f}M"):
        r, peak = sample_peak(*args, "--memory-budget", budget, "--out", tmp / budget)
        assert r.returncode == 0, r.stderr
        assert peak <= parse_size(budget), (budget, peak / MIB)
