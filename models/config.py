"""Frozen configuration dataclasses; they travel inside every checkpoint as plain dicts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from patchgen.runtime.schedule import Schedule
from patchgen.runtime.spec import GCC_SOURCES, PREDICTIONS, ModelSpec

LOSSES = ("l1", "l2")
LOSS_WEIGHTINGS = ("none", "min_snr")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the patch U-Net and to sample from it."""

    image_size: int = 64  # H = W of the whole image, pixels
    channels: int = 3
    grid: int = 2  # G: the image is a G x G grid of patches
    base_width: int = 32  # channels at the first U-Net level
    channel_mults: tuple[int, ...] = (1, 2, 2)  # width multiplier per level; each level after the first halves P
    num_res_blocks: int = 2  # ResNet blocks per level
    # Levels with self-attention, named by the patch's size there (P / 2^level pixels): a halo widens the
    # feature maps but leaves attention at the same level.
    attention_resolutions: tuple[int, ...] = (8,)
    attention_heads: int = 4
    dropout: float = 0.0
    use_position: bool = True  # one-hot patch position -> Linear -> GELU, joined to the time embedding
    use_gcc: bool = True  # Global Content Conditioning: pooled image as extra input channels
    global_context: int = 0  # > 0: GCC pooled to this many cells per side -> MLP -> added to the time embedding
    gcc_source: str = "xt"  # "xt": pool x_t (the paper); "x0": pool the previous step's x0_hat (self-conditioning)
    prediction: str = "eps"  # what the network regresses: "eps", "v" or "x0"; exported graphs always output eps
    schedule: Schedule = field(default_factory=Schedule)
    halo: int = 0  # M: the network reads the (P+2M)^2 window of x_t around its patch and predicts the centre P^2
    edge_mask: bool = False  # with a halo: one more input channel, 1 on the image and 0 in the padding beyond it

    def __post_init__(self):
        problems = []
        if self.grid < 1:
            problems.append(f"grid must be >= 1, got {self.grid}")
        elif self.image_size % self.grid:
            problems.append(f"grid {self.grid} does not divide image size {self.image_size}")
        elif self.halo < 0:
            problems.append(f"halo must be >= 0, got {self.halo}")
        else:
            down = 2 ** (len(self.channel_mults) - 1)
            if self.patch_size % down or self.window_size % down:
                fits = [m for m in range(self.halo + down) if (self.patch_size + 2 * m) % down == 0]
                below, above = [m for m in fits if m < self.halo], [m for m in fits if m > self.halo]
                odd_patch = self.patch_size % down != 0  # the levels are named by the patch's size there
                fix = (f"use halo {' or '.join(str(m) for m in [*below[-1:], *above[:1]])}"
                       if self.halo and fits and not odd_patch else "use fewer channel_mults")
                what = (f"window {self.window_size} (patch {self.patch_size} + 2 x halo {self.halo})"
                        if self.halo and not odd_patch else f"patch size {self.patch_size}")
                problems.append(f"{what} is not divisible by {down}, which {len(self.channel_mults)} U-Net levels "
                                f"need; {fix}")
        if self.halo and self.grid == 1:
            problems.append("a 1x1 grid has no neighbouring patches: halo must be 0")
        if self.edge_mask and not (self.halo and self.use_position):
            problems.append("the edge mask marks a halo's padding by the patch position: it needs a halo (> 0) "
                            "and position conditioning")
        if self.base_width % 8 or self.base_width < 8:
            problems.append(f"base_width must be a multiple of 8 (GroupNorm), got {self.base_width}")
        if self.grid == 1 and self.use_position:
            problems.append("a 1x1 grid has a single position: disable position conditioning")
        if self.prediction not in PREDICTIONS:
            problems.append(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.gcc_source not in GCC_SOURCES:
            problems.append(f"gcc_source must be one of {GCC_SOURCES}, got {self.gcc_source!r}")
        if self.global_context < 0 or (self.global_context and self.patch_size % self.global_context):
            problems.append(f"global_context cells ({self.global_context}) must divide the patch size {self.patch_size}")
        if self.global_context and not self.use_gcc:
            problems.append("global_context is computed from the GCC input: it needs use_gcc")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def patch_size(self) -> int:
        return self.image_size // self.grid

    @property
    def window_size(self) -> int:
        """P + 2M: the side of the network's input window."""
        return self.patch_size + 2 * self.halo

    @property
    def spec(self) -> ModelSpec:
        """The part of the config the runtime needs to sample."""
        return ModelSpec(self.image_size, self.channels, self.grid, self.use_position, self.use_gcc,
                         self.gcc_source, self.prediction, self.schedule, self.halo)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["schedule"] = Schedule(**d.get("schedule", {}))
        for key in ("channel_mults", "attention_resolutions"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; saved with the checkpoint so a resumed run continues identically."""

    batch_size: int = 16  # images per step
    patches_per_image: int = 0  # 0: every patch of each image; k: a random subset of k patches per image
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200  # linear LR warm-up
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float = 0.999
    loss: str = "l1"  # "l1" as in the paper, or "l2"
    loss_weighting: str = "none"  # "none" or "min_snr" (Hang et al. 2023)
    min_snr_gamma: float = 5.0
    seed: int = 0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.seed <= 2**32 - 1:
            raise ValueError(f"seed must be between 0 and {2**32 - 1}, got {self.seed}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**d)
