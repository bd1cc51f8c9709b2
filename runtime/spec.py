"""What the runtime must know about a model to sample from it; read from ONNX metadata or a checkpoint config."""
from __future__ import annotations

from dataclasses import dataclass, field

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


def spec_problems(image_size, channels, grid, halo, use_position, use_gcc, gcc_source, prediction) -> Problems:
    """What is wrong with a model's sampling shape, field by field; ModelSpec, ModelConfig and the ONNX metadata
    reader all check with this one function."""
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
    return problems


@dataclass(frozen=True)
class ModelSpec:
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
        problems = spec_problems(self.image_size, self.channels, self.grid, self.halo, self.use_position,
                                 self.use_gcc, self.gcc_source, self.prediction)
        if not isinstance(self.schedule, Schedule):
            problems.add("schedule", f"must be a Schedule, got {shown(self.schedule)}")
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
