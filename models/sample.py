"""Sampling a torch model with the runtime's own loop and samplers (previews, reference for parity tests)."""
from __future__ import annotations

import numpy as np
import torch

from patchgen.runtime.loop import sample_images

from .diffusion import EpsDenoiser
from .unet import PatchUNet


class TorchPatchNet:
    """Adapter to the runtime's PatchNet contract: numpy patches in, numpy eps out, through a torch module."""

    def __init__(self, net: PatchUNet):
        self.device = next(net.parameters()).device
        self.module = EpsDenoiser(net).to(self.device).eval()  # its schedule buffers beside the weights

    @torch.no_grad()
    def __call__(self, x, t, pos, gcc) -> np.ndarray:
        def tensor(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        return self.module(tensor(x), tensor(t), tensor(pos), tensor(gcc)).float().cpu().numpy()


def sample_torch(net: PatchUNet, num_images: int, seed: int, steps: int = 50, sampler: str = "ddim",
                 eta: float | None = None, patch_batch: int | None = None) -> np.ndarray:
    """Images [N, C, H, W] in [-1, 1] from a torch model; default: all patches of all images in one call."""
    spec = net.config.spec
    was_training = net.training
    net.eval()
    try:
        return sample_images(TorchPatchNet(net), spec, num_images=num_images, seed=seed, steps=steps,
                             sampler=sampler, eta=eta, patch_batch=patch_batch or num_images * spec.grid**2)
    finally:
        net.train(was_training)
