"""The product API: sample images from a patchgen ONNX file under a memory budget."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np

from .errors import PatchgenError
from .images import to_uint8
from .loop import SAMPLERS, sample_images
from .memory import MIB, MemoryModel, calibrate, parse_size, plan_patch_batch
from .model import OnnxModel, load_model

# Full-size float32 arrays alive per image in flight: x_t, x0_hat, eps, the patch copies of x_t and eps,
# the merged eps, and the sampler's temporaries. Charged on top of the measured model of the session.
IMAGE_ARRAYS = 8
OVERHEAD = 4 * MIB  # PNG encoding and Python bookkeeping during sampling


@dataclass(frozen=True)
class Plan:
    patch_batch: int  # patches per onnxruntime call
    images_per_run: int  # images sampled together (sharing calls)
    memory: Optional[MemoryModel]  # the measured model, when a budget chose the batch
    predicted_peak: Optional[int]  # bytes, when a budget chose the batch


def images_per_run(patch_batch: int, grid: int, num_images: int) -> int:
    return max(1, min(num_images, patch_batch // grid**2))


def image_bytes(model: OnnxModel) -> int:
    """Bytes charged per image in flight on top of the measured session model."""
    c, h, w = model.spec.image_shape
    return IMAGE_ARRAYS * 4 * c * h * w


def probe(model: OnnxModel):
    """run(b): one onnxruntime call on b patches of zeros, for calibration."""
    spec = model.spec
    p, g2 = spec.patch_size, spec.grid**2

    def run(b: int) -> None:
        x = np.zeros((b, spec.channels, p, p), np.float32)
        pos = np.eye(g2, dtype=np.float32)[np.arange(b) % g2] if spec.use_position else None
        model(x, np.zeros(b, np.int64), pos, x if spec.use_gcc else None)
    return run


def make_plan(model: OnnxModel, num_images: int, memory_budget: Union[None, int, str] = None,
              patch_batch: Optional[int] = None) -> Plan:
    """Patch batch and images per run: given, from a budget (measured), or the lowest-memory default of 1."""
    g2 = model.spec.grid**2
    if memory_budget is None:
        pb = patch_batch or 1
        if pb < 1:
            raise PatchgenError(f"patch batch must be >= 1, got {pb}")
        return Plan(pb, images_per_run(pb, model.spec.grid, num_images), None, None)
    if patch_batch is not None:
        raise PatchgenError("give either a memory budget or a patch batch, not both: the budget chooses the batch")
    budget = parse_size(memory_budget) if isinstance(memory_budget, str) else int(memory_budget)
    mem = calibrate(probe(model), budget, num_images * g2)
    # The margin for image buffers depends on how many images share a run, which depends on the batch:
    # plan for one image, then re-plan for as many as that batch would run together (never fewer later).
    pb = plan_patch_batch(mem, budget, num_images * g2, OVERHEAD + image_bytes(model))
    n_img = images_per_run(pb, model.spec.grid, num_images)
    if n_img > 1:
        pb = plan_patch_batch(mem, budget, num_images * g2, OVERHEAD + n_img * image_bytes(model))
        n_img = images_per_run(pb, model.spec.grid, num_images)
    return Plan(pb, n_img, mem, mem.peak(pb) + OVERHEAD + n_img * image_bytes(model))


def check_request(model: OnnxModel, num_images: int, steps: int, sampler: str) -> None:
    T = model.spec.schedule.num_timesteps
    if num_images < 1:
        raise PatchgenError(f"number of images must be >= 1, got {num_images}")
    if not 1 <= steps <= T:
        raise PatchgenError(f"steps must be between 1 and {T} (this model's T), got {steps}")
    if sampler not in SAMPLERS:
        raise PatchgenError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def iter_samples(model: OnnxModel, plan: Plan, *, num_images: int, seed: int, steps: int, sampler: str = "ddim",
                 eta: float = 0.0, callback=None) -> Iterator[tuple[int, np.ndarray]]:
    """(image index, uint8 [H, W, C]) for each image, a run of `plan.images_per_run` images at a time.
    Callers check the request first (`check_request`), before planning memory."""
    for first in range(0, num_images, plan.images_per_run):
        n = min(plan.images_per_run, num_images - first)
        x = sample_images(model, model.spec, num_images=n, seed=seed, steps=steps, sampler=sampler, eta=eta,
                          patch_batch=plan.patch_batch, first_index=first, callback=callback)
        for k, image in enumerate(to_uint8(x)):
            yield first + k, image


def generate(model: Union[str, OnnxModel], num_images: int = 1, seed: int = 0, steps: int = 50,
             sampler: str = "ddim", memory_budget: Union[None, int, str] = None,
             patch_batch: Optional[int] = None, eta: float = 0.0, threads: int = 1) -> np.ndarray:
    """uint8 images [N, H, W, C]. Image i depends only on (model, seed, i, steps, sampler, eta)."""
    if not isinstance(model, OnnxModel):
        model = load_model(model, threads)
    check_request(model, num_images, steps, sampler)
    plan = make_plan(model, num_images, memory_budget, patch_batch)
    return np.stack([img for _, img in iter_samples(model, plan, num_images=num_images, seed=seed, steps=steps,
                                                      sampler=sampler, eta=eta)])


def png_text(model: OnnxModel, seed: int, index: int, sampler: str, steps: int, eta: float) -> dict[str, str]:
    """Generation parameters stored in each PNG's text chunks."""
    return {"patchgen:model_sha256": model.sha256, "patchgen:model_file": model.path.name, "patchgen:seed": str(seed),
            "patchgen:index": str(index), "patchgen:sampler": sampler, "patchgen:steps": str(steps),
            "patchgen:eta": str(eta), "Software": "patchgen"}
