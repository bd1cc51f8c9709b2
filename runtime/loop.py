"""The patch loop: a single-patch eps network turned into the full-image denoiser the samplers call."""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from .layout import pad_image, patch_view, pool_gcc, position_onehot, window_view
from .samplers import Projection, image_rngs, normal_like, sample_ddim, sample_ddpm, sample_dpmpp_2m
from .schedule import alphas_cumprod, timestep_sequence
from .spec import ModelSpec

# net(x [B,C,P+2M,P+2M] f32, t [B] i64, pos [B,G*G] f32 | None, gcc [B,C,P,P] f32 | None) -> eps [B,C,P,P] f32
PatchNet = Callable[[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]], np.ndarray]

SAMPLERS = ("ddpm", "ddim", "dpm++")
DEFAULT_STEPS = {"ddim": 50, "dpm++": 20}  # ddpm: every timestep of the model, T
# DPM++ 20 matched DDIM 50's sample quality (KID within 5 %) at 2.2x its speed on the shipped patch models:
# benchmarks/results/quality_samplers_faces64.md and quality_samplers_noto128.md.
DEFAULT_SAMPLER = "dpm++"


def default_sampler(eta: Optional[float] = None, jumps: int = 0) -> str:
    """The sampler when none is asked for: DEFAULT_SAMPLER, or ddim when what is asked needs it (DDIM's
    noise `eta`; RePaint's `jumps`, which dpm++'s multistep update cannot take)."""
    return "ddim" if eta is not None or jumps else DEFAULT_SAMPLER


def default_steps(sampler: str, num_timesteps: int) -> int:
    """Steps when none are asked for: T for ddpm, else the sampler's usual count, at most T."""
    return min(DEFAULT_STEPS.get(sampler, num_timesteps), num_timesteps)


class PatchDenoiser:
    """x_t -> clipped x0_hat for whole images, evaluating the network patch by patch.

    Per step: GCC is pooled once from the full x_t (or, for gcc_source "x0", from
    the previous step's x0_hat, zeros at the first step). With a halo M, x_t is
    copied once into a zero-bordered buffer [N, C, H+2M, W+2M], allocated on the
    first step, and each patch's (P+2M)^2 window is a view into it (`window_view`).
    The G*G windows of every image go through `net` in calls of `patch_batch`,
    each call's windows copied into one input buffer (also allocated once), the
    predicted noise of each patch lands in its place in the eps image, and that
    becomes x0_hat. One instance serves one sampling run.
    """

    def __init__(self, net: PatchNet, spec: ModelSpec, patch_batch: int = 1,
                 known: Optional[tuple[np.ndarray, np.ndarray]] = None):
        if patch_batch < 1:
            raise ValueError(f"patch_batch must be >= 1, got {patch_batch}")
        self.net, self.spec, self.patch_batch = net, spec, patch_batch
        self.alphas_cumprod = alphas_cumprod(spec.schedule)
        # Inpainting: (keep bool [H, W], x_known [1 or N, C, H, W]); x0_hat takes x_known where keep is True, and
        # a patch whose P x P pixels are all kept makes no call (its window still feeds the halos and the GCC).
        self.known = known
        self.active = np.ones(spec.grid**2, bool) if known is None else \
            ~patch_view(known[0][None], spec.grid).all(axis=(-3, -2, -1)).reshape(-1)  # [G*G]: a pixel to make
        self.todo: Optional[np.ndarray] = None  # the patches that make calls (flat indices), set on the first step
        self.positions: Optional[np.ndarray] = None  # one call's one-hot rows [patch_batch, G*G], refilled per call
        self.x0_prev: Optional[np.ndarray] = None  # self-conditioning state
        # padded x_t (halo > 0), one call's windows, the eps image
        self.buffers: Optional[tuple[Optional[np.ndarray], np.ndarray, np.ndarray]] = None

    def gcc(self, x: np.ndarray) -> Optional[np.ndarray]:
        """The GCC input [N, C, P, P] for this step, or None when the model has none."""
        if not self.spec.use_gcc:
            return None
        if self.spec.gcc_source == "xt":
            return pool_gcc(x, self.spec.patch_size)
        if self.x0_prev is None:
            p = self.spec.patch_size
            return np.zeros((x.shape[0], self.spec.channels, p, p), np.float32)
        return pool_gcc(self.x0_prev, self.spec.patch_size)

    def __call__(self, x: np.ndarray, t: int) -> np.ndarray:
        spec = self.spec
        grid, g2, halo, w = spec.grid, spec.grid**2, spec.halo, spec.window_size
        n = x.shape[0]
        if self.buffers is None:
            padded = np.zeros((n, spec.channels, x.shape[2] + 2 * halo, x.shape[3] + 2 * halo), np.float32) \
                if halo else None  # zeros around; only the centre is written after
            calls = min(self.patch_batch, n * g2)
            eps = np.empty_like(x) if self.active.all() else np.zeros_like(x)  # skipped patches: eps 0, x0 kept
            self.buffers = (padded, np.empty((calls, spec.channels, w, w), np.float32), eps)
            self.positions = np.zeros((calls, g2), np.float32) if spec.use_position else None
            # the patches that make calls, as flat indices image * G^2 + position, the same every step
            self.todo = (np.arange(n)[:, None] * g2 + np.flatnonzero(self.active)[None, :]).reshape(-1)
        padded, inputs, eps = self.buffers
        gcc = self.gcc(x)
        windows = window_view(pad_image(x, halo, out=padded) if halo else x, grid, halo)  # [N, G, G, C, W, W]
        eps_patches = patch_view(eps, grid)  # [N, G, G, C, P, P], writes land in eps
        for start in range(0, len(self.todo), self.patch_batch):
            index = self.todo[start:start + self.patch_batch]
            image, i, j = index // g2, index % g2 // grid, index % grid
            for row, (b, r, c) in enumerate(zip(image, i, j)):  # this call's windows into the input buffer
                inputs[row] = windows[b, r, c]
            eps_patches[image, i, j] = self.net(
                inputs[:len(index)],
                np.full(len(index), t, dtype=np.int64),
                position_onehot(grid, index % g2, out=self.positions) if spec.use_position else None,
                gcc[image] if gcc is not None else None,
            )
        # x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped to the data range as in the paper
        abar = float(self.alphas_cumprod[t])
        x0 = np.multiply(eps, -math.sqrt(1 - abar))  # a fresh array: samplers may keep x0 across steps
        x0 += x
        x0 *= 1 / math.sqrt(abar)
        np.clip(x0, -1.0, 1.0, out=x0)
        if self.known is not None:
            np.copyto(x0, self.known[1], where=self.known[0])
        self.x0_prev = x0
        return x0


def edit_timesteps(timesteps: np.ndarray, strength: float) -> np.ndarray:
    """The last floor(len(timesteps) * strength) of `timesteps`: the steps an edit at `strength` runs
    (diffusers' img2img convention; the product is rounded to 9 decimals first, so 0.3 x 50 is 15, not 14).
    Strength 1 runs them all; below 1 / len(timesteps), none."""
    run = math.floor(round(len(timesteps) * strength, 9))
    return timesteps[len(timesteps) - run:]


def known_pixels(init: np.ndarray, eps: np.ndarray, keep: np.ndarray) -> Projection:
    """Inpainting's projection: x_s's kept pixels set to a sample of q(x_s | x_0 = init),
    sqrt(abar_s) init + sqrt(1 - abar_s) eps, at the level abar_s the step just reached (not the level it
    started from: the off-by-one of diffusers' issue #1581)."""
    def project(x_s: np.ndarray, abar_s: float) -> None:
        np.copyto(x_s, math.sqrt(abar_s) * init + math.sqrt(1 - abar_s) * eps, where=keep)
    return project


def sample_images(net: PatchNet, spec: ModelSpec, *, num_images: int, seed: int, steps: int,
                  sampler: str = "ddim", eta: Optional[float] = None, patch_batch: int = 1, first_index: int = 0,
                  callback=None, init: Optional[np.ndarray] = None, keep: Optional[np.ndarray] = None,
                  strength: float = 1.0, jumps: int = 0, on_x0=None) -> np.ndarray:
    """Images [N, C, H, W] in [-1, 1]; image i is a function of (seed, first_index + i) only.

    eta: DDIM's noise (None = 0, deterministic); the other samplers have none and refuse one.
    callback(step index, t) after every step; on_x0(step index, x0_hat [N, C, H, W]) too, with the step's
    estimate of the clean images (read only; the preview).
    Editing, from init [C, H, W] in [-1, 1] (every image starts from it, each with its own noise): img2img
    with `strength`, inpainting with keep bool [H, W] (True = keep the init's pixel) and RePaint's `jumps`;
    `_edit_start` gives the math.
    """
    _check_request(sampler, eta, init, keep, jumps)
    rngs = image_rngs(seed, first_index, num_images)
    x = normal_like(rngs, spec.image_shape)  # x_T ~ N(0, I); with init: eps of the image's forward process
    timesteps = timestep_sequence(spec.schedule.num_timesteps, steps)
    if init is not None:
        init = init[None].astype(np.float32, copy=False)  # [1, C, H, W], broadcast over the images
    denoise = PatchDenoiser(net, spec, patch_batch, None if keep is None else (keep, init))
    project = None
    if init is not None:
        timesteps = edit_timesteps(timesteps, strength)
        if len(timesteps) == 0:
            return np.repeat(init, num_images, axis=0)
        x, project = _edit_start(x, init, keep, float(denoise.alphas_cumprod[timesteps[0]]))
    if on_x0 is not None:
        callback = _with_estimates(callback, on_x0, denoise)
    if sampler == "ddpm":
        return sample_ddpm(denoise, x, timesteps, denoise.alphas_cumprod, rngs, callback=callback, project=project,
                           jumps=jumps)
    if sampler == "dpm++":
        return sample_dpmpp_2m(denoise, x, timesteps, denoise.alphas_cumprod, rngs, callback=callback,
                               project=project)
    return sample_ddim(denoise, x, timesteps, denoise.alphas_cumprod, rngs, eta=eta or 0.0, callback=callback,
                       project=project, jumps=jumps)


def _check_request(sampler: str, eta: Optional[float], init, keep, jumps: int) -> None:
    """ValueError for a combination `sample_images` cannot run."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if eta is not None and sampler != "ddim":
        raise ValueError(f"eta applies to the ddim sampler only, not {sampler}")
    if keep is not None and init is None:
        raise ValueError("keep (an inpainting mask) needs init, the image whose pixels it keeps")
    if jumps and (keep is None or sampler == "dpm++"):
        raise ValueError("jumps (RePaint's resampling) needs keep (inpainting) and the ddim or ddpm sampler")


def _edit_start(eps0: np.ndarray, init: np.ndarray, keep: Optional[np.ndarray], abar: float):
    """(x at the first timestep that runs, the projection of the kept pixels or None) for an edit of init
    [1, C, H, W]; eps0 [N, C, H, W]: each image's own first draw, abar: alphas_cumprod at that timestep.

    - img2img (SDEdit, Meng et al. 2022): only the last floor(steps * strength) timesteps run
      (`edit_timesteps`), from x_t = sqrt(abar_t) init + sqrt(1 - abar_t) eps, eps the image's own first
      draw (as x_T is without init). No step to run returns init.
    - inpainting, keep bool [H, W] (True = keep the init's pixel): at every step x0_hat's kept pixels are
      the init's (patches with every pixel kept make no call), and after each step, at the level abar_s it
      reached, x_s's kept pixels are set to sqrt(abar_s) init + sqrt(1 - abar_s) eps with the same eps
      (the forward process q(x_s | x_0) of the known image, as in RePaint, Lugmayr et al. 2022, eq. 8a, one
      noise draw for the whole run as in diffusers' inpainting pipeline). After the last step (abar 1) the
      kept pixels are init's exactly. This replacement does not sample the exact posterior p(x | kept
      pixels): tests/test_edit.py measures it on a Gaussian with its exact denoiser, where the painted
      pixels' mean falls short of the conditional's; jumps > 0 (ddim and ddpm) adds RePaint's resampling
      (`samplers.sample_ddim`), which brings it closer at jumps + 1 times the calls.
    """
    x = math.sqrt(abar) * init + math.sqrt(1 - abar) * eps0
    return x, (None if keep is None else known_pixels(init, eps0, keep))


def _with_estimates(callback, on_x0, denoise: "PatchDenoiser"):
    """The step callback that also hands on_x0 the step's x0_hat (the denoiser's last estimate)."""
    def step_done(i, t):
        if callback is not None:
            callback(i, t)
        on_x0(i, denoise.x0_prev)
    return step_done
