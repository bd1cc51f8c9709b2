"""Frozen configuration dataclasses; they travel inside every checkpoint as plain dicts."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from patchgen.runtime.checks import Problems, is_int, shown
from patchgen.runtime.schedule import Schedule
from patchgen.runtime.spec import MAX_IMAGE_SIZE, ModelSpec, spec_problems

RECIPES = ("patchgen", "paper")  # patchgen-train --recipe; the first is the default
DEFAULT_RECIPE = RECIPES[0]
RECIPE_LR = {"patchgen": 5e-4, "paper": 2e-4}  # AdamW's learning rate after warm-up
GLOBAL_CONTEXT_CELLS = 4  # the patchgen recipe's global vector: GCC pooled to 4 x 4 cells (fewer where 4 ∤ P)
LOSSES = ("l1", "l2")
LOSS_WEIGHTINGS = ("none", "min_snr")

# Bounds of the fields a checkpoint carries (checkpoints are files anyone can edit): generous for real models,
# small enough that no config can ask for absurd memory before its weights are compared with the file's.
# The paper's U-Nets are 128 wide with 4 levels of multipliers up to 4 and 2-3 ResNet blocks per level.
MAX_BASE_WIDTH = 2048  # channels at the first level; a multiple of 8 (GroupNorm)
MAX_CHANNEL_MULT = 16  # width multiplier of one level
MAX_LEVELS = 8  # U-Net levels (len(channel_mults)); each halves the patch, so 8 levels need patches of 128+
MAX_RES_BLOCKS = 16  # ResNet blocks per level
MAX_BATCH_SIZE = 65536  # images per step, over all ranks
MAX_LR = 1.0  # AdamW diverges far below this; it only catches a corrupt value
MAX_WEIGHT_DECAY = 1.0  # AdamW's decoupled decay per unit of lr; typical values are 0 .. 0.1


def _int_tuple(problems: Problems, name: str, value, low: int, high: int, max_len: int, min_len: int = 0):
    """`value` as a tuple of ints in [low, high], min_len .. max_len of them (a list, as JSON or an older
    checkpoint holds it, is accepted), or None with the problem recorded."""
    if not isinstance(value, (tuple, list)):
        problems.add(name, f"must be a list of integers, got {shown(value)}")
        return None
    if not min_len <= len(value) <= max_len:
        problems.add(name, f"must have between {min_len} and {max_len} entries, got {len(value)}")
        return None
    bad = [v for v in value if not (is_int(v) and low <= v <= high)]
    if bad:
        problems.add(name, f"entries must be integers between {low} and {high}, got {shown(bad[0])}")
        return None
    return tuple(int(v) for v in value)


def _checked_dict(cls, d, what: str) -> dict:
    """A copy of `d`, refused unless it is a dict of `cls`'s fields (missing ones take their defaults)."""
    if not isinstance(d, dict):
        raise ValueError(f"{what}: must be a table of settings, got {shown(d)}")
    unknown = [k for k in d if k not in {f.name for f in dataclasses.fields(cls)}]
    if unknown:
        raise ValueError(f"{what}: unknown keys {', '.join(shown(k) for k in unknown)} (written by a newer "
                         f"patchgen?)")
    return dict(d)


def _built(cls, d: dict, what: str):
    """cls(**d), its ValueError saying which table it came from."""
    try:
        return cls(**d)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


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
        # Each field on its own: types and ranges. Anything wrong here would break the checks after it.
        problems = spec_problems(self.image_size, self.channels, self.grid, self.halo, self.use_position,
                                 self.use_gcc, self.gcc_source, self.prediction)
        if not isinstance(self.schedule, Schedule):
            problems.add("schedule", f"must be a Schedule, got {shown(self.schedule)}")
        if problems.integer("base_width", self.base_width, 8, MAX_BASE_WIDTH) and self.base_width % 8:
            problems.add("base_width", f"must be a multiple of 8 (GroupNorm), got {self.base_width}")
        for name, low, high, max_len, min_len in (("channel_mults", 1, MAX_CHANNEL_MULT, MAX_LEVELS, 1),
                                                  ("attention_resolutions", 1, MAX_IMAGE_SIZE, MAX_LEVELS, 0)):
            value = _int_tuple(problems, name, getattr(self, name), low, high, max_len, min_len)
            if value is not None:
                object.__setattr__(self, name, value)
        problems.integer("num_res_blocks", self.num_res_blocks, 1, MAX_RES_BLOCKS)
        problems.integer("attention_heads", self.attention_heads, 1)
        problems.real("dropout", self.dropout, 0.0, 1.0, high_open=True)
        problems.integer("global_context", self.global_context, 0)
        problems.flag("edge_mask", self.edge_mask)
        if problems:
            raise ValueError(problems.message())
        # How the fields fit together.
        down = 2 ** (len(self.channel_mults) - 1)
        if self.patch_size % down or self.window_size % down:
            fits = [m for m in range(self.halo + down) if (self.patch_size + 2 * m) % down == 0]
            below, above = [m for m in fits if m < self.halo], [m for m in fits if m > self.halo]
            odd_patch = self.patch_size % down != 0  # the levels are named by the patch's size there
            fix = (f"use halo {' or '.join(str(m) for m in [*below[-1:], *above[:1]])}"
                   if self.halo and fits and not odd_patch else "use fewer channel_mults")
            what = (f"window {self.window_size} (patch {self.patch_size} + 2 x halo {self.halo})"
                    if self.halo and not odd_patch else f"patch size {self.patch_size}")
            problems.add(what, f"is not divisible by {down}, which {len(self.channel_mults)} U-Net levels need; "
                               f"{fix}")
        if self.halo and self.grid == 1:
            problems.add("halo", "must be 0 on a 1x1 grid: it has no neighbouring patches")
        if self.edge_mask and not (self.halo and self.use_position):
            problems.add("edge_mask", "marks a halo's padding by the patch position: it needs a halo (> 0) and "
                                      "position conditioning")
        if self.grid == 1 and self.use_position:
            problems.add("use_position", "must be off on a 1x1 grid: it has a single position")
        if self.global_context and self.patch_size % self.global_context:
            problems.add("global_context", f"cells ({self.global_context}) must divide the patch size "
                                           f"{self.patch_size}")
        if self.global_context and not self.use_gcc:
            problems.add("global_context", "is computed from the GCC input: it needs use_gcc")
        attended = {self.widths[-1]} | {w for level, w in enumerate(self.widths)  # the middle block, and levels
                                        if self.patch_size >> level in self.attention_resolutions}
        undivided = sorted(w for w in attended if w % self.attention_heads)
        if undivided:
            problems.add("attention_heads", f"{self.attention_heads} must divide the width of every level with "
                                            f"attention; it does not divide {', '.join(map(str, undivided))}")
        if problems:
            raise ValueError(problems.message())

    @property
    def widths(self) -> list[int]:
        """Channels at each U-Net level."""
        return [self.base_width * m for m in self.channel_mults]

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
        """The config `to_dict` wrote; unknown keys or out-of-range values are a ValueError naming them."""
        d = _checked_dict(cls, d, "model_config")
        d["schedule"] = _built(Schedule, _checked_dict(Schedule, d.get("schedule", {}), "model_config.schedule"),
                               "model_config.schedule")
        return _built(cls, d, "model_config")


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
    recipe: str = ""  # the patchgen-train --recipe the run started from ("" before recipes, or through the API)

    def __post_init__(self):
        problems = Problems()
        problems.integer("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        problems.integer("patches_per_image", self.patches_per_image, 0)  # G*G or more: every patch, as 0
        problems.real("lr", self.lr, 0.0, MAX_LR, low_open=True)
        problems.real("weight_decay", self.weight_decay, 0.0, MAX_WEIGHT_DECAY)
        problems.integer("warmup_steps", self.warmup_steps, 0)
        problems.real("grad_clip", self.grad_clip, 0.0, low_open=True)
        problems.real("ema_decay", self.ema_decay, 0.0, 1.0)
        problems.choice("loss", self.loss, LOSSES)
        problems.choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        problems.real("min_snr_gamma", self.min_snr_gamma, 0.0, low_open=True)
        problems.integer("seed", self.seed, 0, 2**32 - 1)
        if self.recipe != "":
            problems.choice("recipe", self.recipe, RECIPES)
        if problems:
            raise ValueError(problems.message())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The config `to_dict` wrote; unknown keys or out-of-range values are a ValueError naming them."""
        return _built(cls, _checked_dict(cls, d, "train_config"), "train_config")


def recipe_halo(patch_size: int, levels: int) -> int:
    """The patchgen recipe's halo M: the multiple of 2^(levels-1) / 2 nearest P / 4 (at least one such step),
    so that the window P + 2M divides by 2^(levels-1) as the U-Net's levels need whenever P does. P / 4 is
    the halo that met the seam target in benchmarks/results/halo.md (8 px on the shipped 32 px patches)."""
    step = max(1, 2 ** (levels - 1) // 2)
    return max(step, math.floor(patch_size / 4 / step + 0.5) * step)


def recipe_settings(recipe: str, image_size: int, grid: int, levels: int, use_gcc: bool = True) -> dict:
    """The settings a training recipe chooses: prediction, global_context and halo (ModelConfig) and lr
    (TrainConfig). Every other setting is the same in both; each of these can still be set on its own.

    - "patchgen" (patchgen-train's default): x0-prediction, a global context vector of GCC pooled to 4 x 4
      cells (the largest divisor of P up to 4), a halo of about P / 4 (`recipe_halo`; neither on a 1 x 1 grid)
      and lr 5e-4: what the shipped models were trained with (models/pretrained/README.md), and what
      benchmarks/results/recipe.md measures against the paper's on two data sets.
    - "paper": Arakawa et al. 2023's model: eps-prediction, position one-hot and GCC from x_t only (no
      global vector, no halo), lr 2e-4. These are also ModelConfig's and TrainConfig's own defaults, the
      values a checkpoint written before the recipes existed was trained with where it lacks a field.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {shown(recipe)}")
    if recipe == "paper":
        return {"prediction": "eps", "global_context": 0, "halo": 0, "lr": RECIPE_LR["paper"]}
    patch_size = image_size // grid
    patched = grid > 1  # a 1 x 1 model's GCC is its whole x_t again: no global vector, and no neighbours
    cells = math.gcd(patch_size, GLOBAL_CONTEXT_CELLS) if use_gcc and patched else 0
    return {"prediction": "x0", "global_context": cells,
            "halo": recipe_halo(patch_size, levels) if patched else 0, "lr": RECIPE_LR["patchgen"]}
