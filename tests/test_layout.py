"""Patch split/merge, GCC pooling and one-hot positions: exact in numpy, equal in torch."""
import numpy as np
import pytest
import torch

from patchgen.runtime.layout import (crop_centre, from_patches, pad_image, patch_view, pool_gcc, position_onehot,
                                     to_patches, to_windows, window_view)

pytestmark = pytest.mark.quick  # the whole file is in the quick tier (pyproject.toml)


@pytest.mark.parametrize("grid", [1, 2, 4])
def test_split_merge_round_trip_is_exact(grid):
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    p = to_patches(x, grid)
    assert p.shape == (2, grid * grid, 3, 16 // grid, 16 // grid)
    np.testing.assert_array_equal(from_patches(p, grid), x)


def test_patches_are_row_major_blocks():
    x = np.arange(2 * 8 * 12, dtype=np.float32).reshape(2, 8, 12)  # C=2, H=8, W=12: non-square catches h/w mix-ups
    p = to_patches(x, 2)
    for i in range(2):
        for j in range(2):
            np.testing.assert_array_equal(p[i * 2 + j], x[:, i * 4:(i + 1) * 4, j * 6:(j + 1) * 6])


def test_torch_layout_matches_numpy():
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    xt = torch.from_numpy(x)
    np.testing.assert_array_equal(to_patches(xt, 4).numpy(), to_patches(x, 4))
    np.testing.assert_array_equal(from_patches(to_patches(xt, 4), 4).numpy(), x)


def test_gcc_is_the_block_mean():
    x = np.random.default_rng(2).standard_normal((2, 3, 12, 12)).astype(np.float32)
    g = pool_gcc(x, 4)  # blocks of 3x3
    assert g.shape == (2, 3, 4, 4)
    for a in range(4):
        for b in range(4):
            np.testing.assert_allclose(g[..., a, b], x[..., 3 * a:3 * a + 3, 3 * b:3 * b + 3].mean(axis=(-2, -1)),
                                       rtol=0, atol=1e-6)
    np.testing.assert_array_equal(pool_gcc(x, 12), x)  # pooling to full size is the identity


def test_gcc_torch_numpy_parity():
    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(pool_gcc(torch.from_numpy(x), 16).numpy(), pool_gcc(x, 16), rtol=0, atol=1e-6)


def test_onehot_order():
    p = position_onehot(3)
    assert p.shape == (9, 9) and p.dtype == np.float32
    assert [int(np.argmax(row)) for row in p] == list(range(9))  # patch (i, j) -> index i*G + j
    np.testing.assert_array_equal(p.sum(axis=1), np.ones(9))


def test_grid_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        to_patches(np.zeros((3, 10, 10)), 3)


def crop_reference(x: np.ndarray, grid: int, halo: int) -> np.ndarray:
    """The windows by the definition: zero-pad the image by M, crop (P+2M)^2 at (iP, jP), loop by loop."""
    *lead, c, h, w = x.shape
    ph, pw = h // grid, w // grid
    padded = np.zeros((*lead, c, h + 2 * halo, w + 2 * halo), x.dtype)
    padded[..., halo:halo + h, halo:halo + w] = x
    return np.stack([padded[..., i * ph:i * ph + ph + 2 * halo, j * pw:j * pw + pw + 2 * halo]
                     for i in range(grid) for j in range(grid)], axis=-4)


@pytest.mark.parametrize("grid,halo", [(1, 0), (2, 0), (2, 1), (2, 4), (4, 2), (4, 8), (2, 12)])
@pytest.mark.parametrize("lead", [(), (3,)])
def test_windows_equal_cropping_the_padded_image(grid, halo, lead):
    # Non-square (H != W) catches row/column mix-ups; halo 12 > P = 8 reaches past the neighbours.
    x = np.random.default_rng(grid + halo).standard_normal((*lead, 2, 16, 24)).astype(np.float32)
    want = crop_reference(x, grid, halo)
    assert want.shape == (*lead, grid * grid, 2, 16 // grid + 2 * halo, 24 // grid + 2 * halo)
    np.testing.assert_array_equal(to_windows(x, grid, halo), want)
    np.testing.assert_array_equal(to_windows(torch.from_numpy(x), grid, halo).numpy(), want)
    view = window_view(pad_image(x, halo), grid, halo)  # [..., G, G, C, W, W]
    np.testing.assert_array_equal(view.reshape(want.shape), want)
    tview = window_view(pad_image(torch.from_numpy(x), halo), grid, halo)
    np.testing.assert_array_equal(tview.reshape(want.shape).numpy(), want)
    np.testing.assert_array_equal(crop_centre(want, halo), to_patches(x, grid))  # the centre is the patch


def test_windows_are_views_into_a_reused_buffer():
    rng = np.random.default_rng(0)
    x1, x2 = (rng.standard_normal((2, 3, 16, 16)).astype(np.float32) for _ in range(2))
    buf = pad_image(x1, 4)
    view = window_view(buf, 2, 4)
    assert np.shares_memory(view, buf)
    assert pad_image(x2, 4, out=buf) is buf  # the next step: same buffer, zero border kept
    np.testing.assert_array_equal(view.reshape(2, 4, 3, 16, 16), crop_reference(x2, 2, 4))
    np.testing.assert_array_equal(window_view(x1, 2, 0), patch_view(x1, 2))  # halo 0: the patches themselves
    xt = torch.from_numpy(x1)
    assert window_view(xt, 2, 0).data_ptr() == xt.data_ptr()
