"""What the runtime must know about a model to sample from it; read from ONNX metadata or a checkpoint config."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from .layout import position_onehot
from .checks import Problems, shown
from .schedule import Schedule

GCC_SOURCES = ("xt", "x0")
PREDICTIONS = ("eps", "v", "x0")  # what a network regresses; exported graphs always output eps
MAX_CHANNELS = 4  # what a PNG holds: L, LA, RGB, RGBA
# A sanity bound, not a memory check: sizes come from untrusted files, and this keeps image_size, grid^2 and
# every shape derived from them in ranges where the arithmetic and the declared graph shapes stay harmless.
# One float32 RGB image at this size is 48 GiB; whether a model's images fit the memory a process can have
# is checked separately, before anything that size is allocated.
MAX_IMAGE_SIZE = 65536


def spec_problems(image_size, channels, grid, use_position, use_gcc, gcc_source="xt", prediction="eps",
                  schedule=None, halo=0) -> Problems:
    """What is wrong with a model's sampling shape, field by field (the arguments are ModelSpec's fields);
    ModelSpec, ModelConfig and the ONNX metadata reader all check with this one function. `schedule`: only its
    type, where one is given (the metadata reader checks the schedule's keys itself)."""
    problems = Problems()
    size_ok = problems.integer("image_size", image_size, 1, MAX_IMAGE_SIZE)
    problems.integer("channels", channels, 1, MAX_CHANNELS, why=" (what a PNG holds: L, LA, RGB or RGBA)")
    grid_ok, halo_ok = problems.integer("grid", grid, 1), problems.integer("halo", halo, 0)
    if size_ok and grid_ok:
        if grid > image_size:
            problems.add("grid", f"must be at most the image size {image_size} (patches of at least 1 pixel), "
                                 f"got {shown(grid)}")
        elif image_size % grid:
            problems.add("grid", f"{grid} does not divide image size {image_size}")
        elif halo_ok and halo > image_size // grid:
            problems.add("halo", f"must be at most the patch size {image_size // grid} (a patch reads at most its "
                                 f"direct neighbours), got {shown(halo)}")
    problems.flag("use_position", use_position)
    problems.flag("use_gcc", use_gcc)
    problems.choice("gcc_source", gcc_source, GCC_SOURCES)
    problems.choice("prediction", prediction, PREDICTIONS)
    if schedule is not None and not isinstance(schedule, Schedule):
        problems.add("schedule", f"must be a Schedule, got {shown(schedule)}")
    return problems


def fit_problems(patch_size: int, grid: int, halo: int, levels: int, use_position: bool, use_gcc: bool,
                 global_context: int, edge_mask: bool) -> Problems:
    """How a patch network's settings fit together, once each is valid on its own (ModelConfig checks with it):
    the (P+2M)^2 window through `levels` U-Net levels that halve it, a halo and the position on a 1x1 grid,
    the edge mask, and the global context vector's cells (GCC pooled to global_context^2 cells)."""
    problems = Problems()
    down = 2 ** (levels - 1)
    if patch_size % down or (patch_size + 2 * halo) % down:
        problems.add(*_window_problem(patch_size, halo, levels))
    if halo and grid == 1:
        problems.add("halo", "must be 0 on a 1x1 grid: it has no neighbouring patches")
    if edge_mask and not (halo and use_position):
        problems.add("edge_mask", "marks a halo's padding by the patch position: it needs a halo (> 0) and "
                                  "position conditioning")
    if grid == 1 and use_position:
        problems.add("use_position", "must be off on a 1x1 grid: it has a single position")
    if global_context and patch_size % global_context:
        problems.add("global_context", f"cells ({global_context}) must divide the patch size {patch_size}")
    if global_context and not use_gcc:
        problems.add("global_context", "is computed from the GCC input: it needs use_gcc")
    return problems


def _window_problem(patch_size: int, halo: int, levels: int) -> tuple[str, str]:
    """(what, problem) for a patch or window that `levels` U-Net levels cannot halve down, with the nearest
    halos that fit (the levels are named by the patch's size there, so a patch that does not fit needs fewer)."""
    down = 2 ** (levels - 1)
    fits = [m for m in range(halo + down) if (patch_size + 2 * m) % down == 0]
    below, above = [m for m in fits if m < halo], [m for m in fits if m > halo]
    odd_patch = patch_size % down != 0
    fix = (f"use halo {' or '.join(str(m) for m in [*below[-1:], *above[:1]])}"
           if halo and fits and not odd_patch else "use fewer channel_mults")
    what = (f"window {patch_size + 2 * halo} (patch {patch_size} + 2 x halo {halo})"
            if halo and not odd_patch else f"patch size {patch_size}")
    return what, f"is not divisible by {down}, which {levels} U-Net levels need; {fix}"


@dataclass(frozen=True)
class ModelSpec:
    """What the runtime must know to sample from a model (DESIGN.md's contract), read from an ONNX file's
    metadata or derived from a ModelConfig (`ModelConfig.spec`); every field is checked by `spec_problems`."""

    image_size: int  # H = W, pixels
    channels: int
    grid: int  # G x G patches of P = image_size / G
    use_position: bool  # the network takes `pos`
    use_gcc: bool  # the network takes `gcc`
    gcc_source: str = "xt"  # "xt": pool x_t; "x0": pool the previous step's x0_hat (zeros at the first step)
    prediction: str = "eps"  # what the network was trained to regress (the graph always outputs eps)
    schedule: Schedule = field(default_factory=Schedule)
    halo: int = 0  # M: pixels of neighbour context on each side of a patch (0 = the paper's model)

    def __post_init__(self):
        problems = spec_problems(**spec_values(self))
        if problems:
            raise ValueError(problems.message())

    @property
    def patch_size(self) -> int:
        return self.image_size // self.grid

    @property
    def window_size(self) -> int:
        """P + 2M: the side of the window of x_t the network reads for one patch."""
        return self.patch_size + 2 * self.halo

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


def spec_values(config) -> dict:
    """ModelSpec's fields, by name, from `config` (a ModelSpec, or a ModelConfig, which holds each of them)."""
    return {f.name: getattr(config, f.name) for f in fields(ModelSpec)}


def graph_inputs(spec: ModelSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The single-patch graph's inputs in order, name -> (dtype, shape after the batch dimension).

    x [C, P+2M, P+2M] and t [] always; pos [G*G] with position conditioning; gcc [C, P, P] with GCC.
    The one list of the contract (DESIGN.md, README): loading, probing, export and tests all use it."""
    c, p, w = spec.channels, spec.patch_size, spec.window_size
    inputs = {"x": ("float32", (c, w, w)), "t": ("int64", ())}
    if spec.use_position:
        inputs["pos"] = ("float32", (spec.grid**2,))
    if spec.use_gcc:
        inputs["gcc"] = ("float32", (c, p, p))
    return inputs


def example_feeds(spec: ModelSpec, t, rng: np.random.Generator, first_position: int = 0) -> dict[str, np.ndarray]:
    """Inputs for len(t) patches per `graph_inputs`: x and gcc ~ N(0, 1) (every page written), pos one-hot
    for positions first_position, first_position + 1, ... (mod G*G) in turn, t as given."""
    t = np.asarray(t, dtype=np.int64).reshape(-1)
    b, feeds = len(t), {}
    for name, (dtype, shape) in graph_inputs(spec).items():
        if name == "t":
            feeds[name] = t
        elif name == "pos":  # b rows of G^2, never a G^2 x G^2 identity
            feeds[name] = position_onehot(spec.grid, (first_position + np.arange(b)) % spec.grid**2)
        else:
            feeds[name] = rng.standard_normal((b, *shape), dtype=np.float32)
    return feeds
