"""Frozen configuration dataclasses; they travel inside every checkpoint as plain dicts."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from patchgen.runtime.checks import Problems, is_int, shown
from patchgen.runtime.schedule import MAX_TIMESTEPS, SCHEDULE_KINDS, Schedule, min_timesteps
from patchgen.runtime.spec import (GCC_SOURCES, MAX_IMAGE_SIZE, PREDICTIONS, ModelSpec, fit_problems, spec_problems,
                                   spec_values)

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
class Option:
    """How patchgen-train sets a config field, kept in the field's metadata (see `option`); cli/train.py makes
    the click option from it. The values it takes: `choices`, or the range low .. high (open at an end where
    asked) of an int or float field, or comma-separated integers for a tuple field; a bool field is a flag,
    which turns the setting off where its name starts with "no-"."""

    help: str = ""
    name: str = ""  # the option is --name; "" = the field's name with dashes
    choices: tuple[str, ...] = ()
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    default: Any = ...  # the option's default: ... = the field's; None = the recipe's (`recipe_settings`)
    key: str = ""  # on a field that holds a dataclass (the schedule): which of its fields the option sets
    # --resume may change it; otherwise (every option so far) it is refused there: a resumed run keeps its
    # checkpoint's configuration. A resumable option also needs the resume (models/train.py) to apply it.
    resumable: bool = False
    named: str = ""  # how an error names the field where not as --name (a flag that turns it off)


def option(help: str = "", **settings) -> dict:
    """A field's metadata: the one patchgen-train option that sets it (`Option`'s fields)."""
    return {"options": (Option(help, **settings),)}


def field_options(cls) -> list[tuple[dataclasses.Field, Option]]:
    """(field, option) for each patchgen-train option that sets a field of the dataclass `cls`, in field order."""
    return [(f, o) for f in dataclasses.fields(cls) for o in f.metadata.get("options", ())]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the patch U-Net and to sample from it. It holds each of ModelSpec's fields
    under the same name (`spec` is the runtime's part of it), with a new patchgen-train run's defaults."""

    image_size: int = field(default=64, metadata=option("Image side in pixels.", low=4, high=MAX_IMAGE_SIZE))
    channels: int = 3
    grid: int = field(default=2, metadata=option("G: patches per side (1 = full-image DDPM).", low=1))
    base_width: int = field(default=32, metadata=option(  # channels at the first U-Net level
        "U-Net channels at the first level (multiple of 8).", low=8, high=MAX_BASE_WIDTH))
    channel_mults: tuple[int, ...] = field(default=(1, 2, 2), metadata=option(  # each level after the first halves P
        "Width multiplier per U-Net level."))
    num_res_blocks: int = field(default=2, metadata=option(low=1, high=MAX_RES_BLOCKS))  # ResNet blocks per level
    # Levels with self-attention, named by the patch's size there (P / 2^level pixels): a halo widens the
    # feature maps but leaves attention at the same level.
    attention_resolutions: tuple[int, ...] = field(default=(8,), metadata=option(
        "Feature-map sizes with self-attention."))
    attention_heads: int = 4
    dropout: float = field(default=0.0, metadata=option(low=0, high=1, high_open=True))
    use_position: bool = field(default=True, metadata=option(  # one-hot position -> Linear -> GELU -> time embedding
        "Ablation: no position conditioning.", name="no-position", named="position conditioning (--no-position)"))
    use_gcc: bool = field(default=True, metadata=option(  # Global Content Conditioning: the pooled image as channels
        "Ablation: no Global Content Conditioning.", name="no-gcc", named="GCC (on unless --no-gcc)"))
    global_context: int = field(default=0, metadata=option(  # > 0: GCC pooled to N x N cells -> MLP -> time embedding
        "Cells per side of a global context vector from GCC, 0 = off [default: the recipe's, 4 (or the largest "
        "divisor of P below it) or 0].", low=0, default=None))
    gcc_source: str = field(default="xt", metadata=option(  # "x0": the previous x0_hat (self-conditioning)
        "Pool x_t (paper) or the previous x0 estimate (self-conditioning).", choices=GCC_SOURCES))
    prediction: str = field(default="eps", metadata=option(  # exported graphs always output eps
        "Network target (the ONNX graph always outputs eps) [default: the recipe's, x0 or eps].",
        choices=PREDICTIONS, default=None))
    schedule: Schedule = field(default_factory=Schedule, metadata={"options": (
        Option(name="schedule", key="kind", choices=SCHEDULE_KINDS),
        Option(f"T. Sampling starts from pure noise, which needs T >= {min_timesteps('cosine')} (cosine) or "
               f">= {min_timesteps('linear')} (linear).", name="timesteps", key="num_timesteps", low=2,
               high=MAX_TIMESTEPS))})
    halo: int = field(default=0, metadata=option(  # M: the network reads (P+2M)^2 of x_t, predicts the centre P^2
        "M: each patch also sees M pixels of its neighbours per side ((P+2M)^2 window, zero-padded at the image's "
        "edge) and predicts its own P x P; P and P+2M must divide by 2^(levels-1) [default: the recipe's: the "
        "multiple of 2^(levels-2) nearest P/4, or 0 (the paper)].", low=0, default=None))
    edge_mask: bool = field(default=False, metadata=option(  # 1 on the image, 0 in the padding beyond it
        "One more input channel marking the image against the padding beyond its edge; needs --halo and "
        "position conditioning."))

    def __post_init__(self):
        # Each field on its own: types and ranges. Anything wrong here would break the checks after it.
        problems = spec_problems(**spec_values(self))
        problems.extend(self._network_problems())
        if problems:
            raise ValueError(problems.message())
        # How the fields fit together.
        problems = fit_problems(self.patch_size, self.grid, self.halo, len(self.channel_mults), self.use_position,
                                self.use_gcc, self.global_context, self.edge_mask)
        attended = {self.widths[-1]} | {w for level, w in enumerate(self.widths)  # the middle block, and levels
                                        if self.patch_size >> level in self.attention_resolutions}
        undivided = sorted(w for w in attended if w % self.attention_heads)
        if undivided:
            problems.add("attention_heads", f"{self.attention_heads} must divide the width of every level with "
                                            f"attention; it does not divide {', '.join(map(str, undivided))}")
        if problems:
            raise ValueError(problems.message())

    def _network_problems(self) -> Problems:
        """The U-Net's own fields, each on its own (the lists become tuples)."""
        problems = Problems()
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
        return problems

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
        """The part of the config the runtime needs to sample: ModelSpec's fields, as this config holds them."""
        return ModelSpec(**spec_values(self))

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

    batch_size: int = field(default=16, metadata=option(
        "Images per step, over all ranks: under torchrun each of N ranks computes batch/N of them (a multiple of N).",
        low=1, high=MAX_BATCH_SIZE))
    patches_per_image: int = field(default=0, metadata=option(  # k: a random subset of k patches per image
        "Random patches per image per step (0 = all).", low=0))
    lr: float = field(default=2e-4, metadata=option(
        f"AdamW's learning rate after the warm-up [default: the recipe's, {RECIPE_LR['patchgen']:g} or "
        f"{RECIPE_LR['paper']:g}].", low=0, high=MAX_LR, low_open=True, default=None))
    weight_decay: float = 0.0
    warmup_steps: int = field(default=200, metadata=option(low=0))  # linear LR warm-up
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float = field(default=0.999, metadata=option(low=0, high=1))
    loss: str = field(default="l1", metadata=option(choices=LOSSES))  # "l1" as in the paper, or "l2"
    loss_weighting: str = field(default="none", metadata=option(  # "min_snr": Hang et al. 2023
        choices=LOSS_WEIGHTINGS))
    min_snr_gamma: float = 5.0
    seed: int = field(default=0, metadata=option(low=0, high=2**32 - 1))
    # The patchgen-train --recipe the run started from ("" before recipes, or through the API).
    recipe: str = field(default="", metadata=option(
        "The defaults of --prediction, --global-context, --halo and --lr. patchgen: x0, a global vector of 4x4 "
        "cells, a halo of about P/4 (P = image size / grid), 5e-4: the shipped models' recipe "
        "(benchmarks/results/recipe.md). paper: Arakawa et al. 2023's model: eps, none, 0, 2e-4.",
        choices=RECIPES, default=DEFAULT_RECIPE))

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
