"""Patch split/merge, GCC pooling and one-hot positions: exact in numpy, equal in torch."""
import numpy as np
import pytest
import torch

from patchgen.runtime.layout import from_patches, pool_gcc, position_onehot, to_patches


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
