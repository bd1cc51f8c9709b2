"""What the runtime must know about a model to sample from it; read from ONNX metadata or a checkpoint config."""
from __future__ import annotations

from dataclasses import dataclass, field

from .schedule import Schedule

GCC_SOURCES = ("xt", "x0")
PREDICTIONS = ("eps", "v", "x0")  # what a network regresses; exported graphs always output eps


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

    @property
    def patch_size(self) -> int:
        return self.image_size // self.grid

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)
