"""A patchgen-contract ONNX model whose weights dominate its memory: a stack of wide 3x3 convolutions on small
patches, built with onnx.helper in a second (no torch, no export), for the tests of the weights' load path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from patchgen.runtime.metadata import spec_to_metadata
from patchgen.runtime.spec import ModelSpec


def weighty_model(width: int = 384, depth: int = 10, image_size: int = 32, grid: int = 2, seed: int = 0) -> onnx.ModelProto:
    """eps = convs(x) + gcc + 0 * (t + sum(pos)): about depth * width^2 * 36 bytes of Conv weights."""
    spec = ModelSpec(image_size=image_size, channels=3, grid=grid, use_position=True, use_gcc=True)
    p = spec.patch_size
    rng = np.random.default_rng(seed)
    initializers, nodes = [], []

    def conv(name: str, cin: int, cout: int, x: str) -> str:
        w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
        initializers.extend([numpy_helper.from_array(w, f"{name}.weight"),
                             numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}.bias")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [name], pads=[1, 1, 1, 1]))
        return name

    h = conv("conv_in", 3, width, "x")
    for i in range(depth):
        h = conv(f"conv{i}", width, width, h)
        nodes.append(helper.make_node("Relu", [h], [f"{h}.relu"]))
        h = f"{h}.relu"
    h = conv("conv_out", width, 3, h)
    initializers += [numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
                     numpy_helper.from_array(np.array([1], np.int64), "axis1"),
                     numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "per_patch")]
    nodes += [helper.make_node("Cast", ["t"], ["t_float"], to=TensorProto.FLOAT),
              helper.make_node("ReduceSum", ["pos", "axis1"], ["pos_sum"], keepdims=0),
              helper.make_node("Add", ["t_float", "pos_sum"], ["cond"]),
              helper.make_node("Mul", ["cond", "zero"], ["cond_zero"]),
              helper.make_node("Reshape", ["cond_zero", "per_patch"], ["cond4"]),
              helper.make_node("Add", [h, "gcc"], ["with_gcc"]),
              helper.make_node("Add", ["with_gcc", "cond4"], ["eps"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, p, p]),
              helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"]),
              helper.make_tensor_value_info("pos", TensorProto.FLOAT, ["batch", grid * grid]),
              helper.make_tensor_value_info("gcc", TensorProto.FLOAT, ["batch", 3, p, p])]
    graph = helper.make_graph(nodes, "weighty", inputs,
                              [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", 3, p, p])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, spec_to_metadata(spec))
    onnx.checker.check_model(model)
    return model


def write_weighty(path: Path, **kwargs) -> Path:
    onnx.save(weighty_model(**kwargs), str(path))
    return path
