"""The patch U-Net: shapes for every grid and conditioning, prediction conversions, config checks."""
import numpy as np
import pytest
import torch

from patchgen.models.config import ModelConfig
from patchgen.models.diffusion import (EpsDenoiser, eps_from_prediction, predict_full, prediction_target,
                                       schedule_coefficients, x0_from_prediction)
from patchgen.models.unet import PatchUNet, edge_masks
from patchgen.runtime.schedule import Schedule

from conftest import tiny_config


def inputs(config: ModelConfig, b: int):
    p, w, g2 = config.patch_size, config.window_size, config.grid**2
    pos = torch.eye(g2)[torch.arange(b) % g2] if config.use_position else None
    gcc = torch.randn(b, config.channels, p, p) if config.use_gcc else None
    return torch.randn(b, config.channels, w, w), torch.randint(0, 1000, (b,)), pos, gcc


@pytest.mark.parametrize("grid", [1, 2, 4])
@pytest.mark.parametrize("use_position,use_gcc", [(True, True), (True, False), (False, True), (False, False)])
def test_output_shape(grid, use_position, use_gcc):
    if grid == 1 and use_position:
        pytest.skip("a 1x1 grid has no position conditioning")
    config = tiny_config(image_size=32, grid=grid, use_position=use_position, use_gcc=use_gcc)
    net = PatchUNet(config)
    out = net(*inputs(config, 3))
    assert out.shape == (3, 3, config.patch_size, config.patch_size)
    assert hasattr(net, "pos_embed") == use_position
    assert net.conv_in.in_channels == (6 if use_gcc else 3)


@pytest.mark.parametrize("halo,edge_mask", [(2, False), (4, True), (12, True)])
def test_halo_reads_the_window_and_returns_the_centre(halo, edge_mask):
    config = tiny_config(image_size=32, grid=2, halo=halo, edge_mask=edge_mask)  # P = 16, window 16 + 2M
    net = PatchUNet(config).eval()
    x, t, pos, gcc = inputs(config, 2)
    with torch.no_grad():
        out = net(x, t, pos, gcc)
        assert out.shape == (2, 3, 16, 16)
        assert net.conv_in.in_channels == 6 + edge_mask
        x2 = x.clone()
        x2[:, :, :halo, :] += 1  # only the halo's top rows change: the centre's prediction must see it
        assert not torch.allclose(net(x2, t, pos, gcc), out)
    # Attention stays at its level (patch size 8 there), whatever the window is.
    plain = PatchUNet(tiny_config(image_size=32, grid=2))
    count = lambda m: sum(type(k).__name__ == "SelfAttention" for k in m.modules())  # noqa: E731
    assert count(net) == count(plain)


@pytest.mark.quick
def test_edge_masks_mark_the_image():
    config = tiny_config(image_size=16, grid=2, halo=2, edge_mask=True)  # P = 8, window 12
    masks = edge_masks(config).reshape(2, 2, 12, 12)
    want = np.zeros((12, 12))
    want[2:, 2:] = 1  # patch (0, 0): the padding is above and left of it
    np.testing.assert_array_equal(masks[0, 0].numpy(), want)
    np.testing.assert_array_equal(masks[1, 1].numpy(), want[::-1, ::-1])
    np.testing.assert_array_equal(masks[0, 1].numpy(), want[:, ::-1])


def test_global_context_and_conditioning_change_the_output():
    torch.manual_seed(0)
    config = tiny_config(global_context=2)
    net = PatchUNet(config).eval()
    x, t, pos, gcc = inputs(config, 2)
    base = net(x, t, pos, gcc)
    assert not torch.allclose(base, net(x, t, pos.flip(0), gcc))  # position matters
    assert not torch.allclose(base, net(x, t, pos, gcc + 1))  # GCC matters
    assert not torch.allclose(base, net(x, (t + 100) % 1000, pos, gcc))  # time matters


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_prediction_conversions_round_trip(kind):
    a, s = schedule_coefficients(Schedule())
    x0, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 900])
    x_t = a[t][:, None, None, None] * x0 + s[t][:, None, None, None] * noise
    target = prediction_target(kind, x0, noise, t, a, s)
    torch.testing.assert_close(eps_from_prediction(kind, target, x_t, t, a, s), noise, atol=2e-3, rtol=0)
    torch.testing.assert_close(x0_from_prediction(kind, target, x_t, t, a, s), x0, atol=2e-3, rtol=0)


def test_eps_denoiser_outputs_eps_for_x0_networks():
    torch.manual_seed(0)
    config = tiny_config(prediction="x0")
    net = PatchUNet(config).eval()
    x, t, pos, gcc = inputs(config, 2)
    a, s = schedule_coefficients(config.schedule)
    expected = (x - a[t][:, None, None, None] * net(x, t, pos, gcc)) / s[t][:, None, None, None]
    torch.testing.assert_close(EpsDenoiser(net)(x, t, pos, gcc), expected)


@pytest.mark.quick
def test_predict_full_assembles_patches_in_order():
    torch.manual_seed(0)
    config = tiny_config(use_gcc=False)
    net = PatchUNet(config).eval()
    x_t = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 700])
    full = predict_full(net, x_t, t, None)
    # patch (1, 0) of image 1 is position 2
    direct = net(x_t[1:, :, 8:, :8], t[1:], torch.eye(4)[2:3], None)
    torch.testing.assert_close(full[1:, :, 8:, :8], direct, atol=1e-5, rtol=0)


@pytest.mark.quick
@pytest.mark.parametrize("overrides,message", [
    (dict(grid=3), "does not divide"),
    (dict(grid=0), "grid must be >= 1"),
    (dict(grid=1), "single position"),
    (dict(base_width=12), "multiple of 8"),
    (dict(prediction="score"), "prediction must be"),
    (dict(channel_mults=(1, 2, 2, 2, 2)), "not divisible"),
    (dict(global_context=2, use_gcc=False), "needs use_gcc"),
    (dict(halo=1, channel_mults=(1, 2, 2)),
     r"window 10 \(patch 8 \+ 2 x halo 1\) is not divisible by 4, which 3 U-Net levels need; use halo 0 or 2"),
    (dict(halo=-1), "halo must be >= 0"),
    (dict(image_size=36, halo=1, channel_mults=(1, 2, 2)), "patch size 18 is not divisible by 4"),
    (dict(grid=1, use_position=False, halo=2), "no neighbouring patches"),
    (dict(edge_mask=True), "needs a halo"),
    (dict(halo=2, edge_mask=True, use_position=False), "needs a halo .* and position conditioning"),
])
def test_config_rejects(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


@pytest.mark.quick
def test_config_dict_round_trip():
    config = tiny_config(schedule=Schedule(kind="linear", num_timesteps=500), prediction="v", global_context=2,
                         halo=2, edge_mask=True)
    assert ModelConfig.from_dict(config.to_dict()) == config
