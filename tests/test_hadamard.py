"""Hadamard matrices and the fast block-diagonal transform against explicit matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from specq.formats.hadamard import factor_sizes, hadamard_matrix, hadamard_transform, supported

SIZES = [1, 2, 4, 8, 12, 20, 24, 40, 64, 96, 128, 160, 576, 1536]


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.mark.parametrize("n", SIZES)
def test_orthonormal_hadamard(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    # a Hadamard matrix: every entry is +-1/sqrt(n)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), rtol=1e-12)


@pytest.mark.parametrize("a", range(0, 11))
def test_power_of_two_is_sylvester(a):
    n = 2 ** a
    h = hadamard_matrix(n) * math.sqrt(n)
    assert torch.equal(torch.round(h), torch.from_numpy(sylvester(n))), n


@pytest.mark.parametrize("n, block", [(64, None), (576, 64), (1536, 64), (576, None), (1536, None),
                                      (96, 12), (96, 32), (120, 20), (40, 20), (4096, 4096), (12, 12)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_transform_equals_explicit_block_diagonal(n, block, dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 2, n, dtype=torch.float64)
    bs = n if block is None else block
    big = torch.block_diag(*[hadamard_matrix(bs)] * (n // bs))
    want = x @ big
    got = hadamard_transform(x.to(dtype), block)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(got.double(), want, atol=tol * math.sqrt(bs), rtol=0)
    back = hadamard_transform(got, block, inverse=True)
    assert torch.allclose(back.double(), x, atol=tol * 10, rtol=0)


def test_inverse_of_non_symmetric_paley_factor():
    h = hadamard_matrix(12)
    assert not torch.allclose(h, h.T)  # Paley I is skew-type: the inverse really needs the transpose
    x = torch.randn(5, 12, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x, inverse=True), x @ h.T, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    x = torch.randn(4, 576)
    got = hadamard_transform(x.to(dtype), 64)
    want = hadamard_transform(x.double(), 64)
    assert got.dtype == dtype
    assert torch.allclose(got.double(), want, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("block", [576, 20, 64])
def test_low_precision_has_no_systematic_scale_error(block):
    """Weights are rotated in float32; the bf16 activation rotation must not be off by a constant
    (1/sqrt(12) rounded to bf16 is 0.2% too large: a bf16 factor matrix would scale every output)."""
    torch.manual_seed(0)
    x = torch.randn(400, 1920 if block == 20 else 576)
    want = hadamard_transform(x.double(), block)
    got = hadamard_transform(x.bfloat16(), block).double()
    ratio = ((got * want).sum() / want.square().sum()).item()
    assert abs(ratio - 1) < 2e-4, ratio


def test_norm_preserved_and_outliers_spread():
    x = torch.zeros(1, 64, dtype=torch.float64)
    x[0, 3] = 8.0  # one outlier -> spread evenly over the block (why rotation helps INT4 activations)
    y = hadamard_transform(x)
    assert torch.allclose(y.abs(), torch.full_like(y, 1.0))
    assert torch.allclose(y.norm(), x.norm())


def test_factor_sizes_and_support():
    assert factor_sizes(576) == (12, 12, 4)
    assert factor_sizes(1536) == (12, 64, 2)
    assert factor_sizes(5120) == (20, 64, 4)
    assert all(supported(n) for n in SIZES)
    assert not supported(28) and not supported(36) and not supported(3) and not supported(0)


def test_empty_and_1d_inputs():
    assert hadamard_transform(torch.zeros(0, 64)).shape == (0, 64)
    x = torch.randn(12, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ hadamard_matrix(12), atol=1e-13)


@pytest.mark.parametrize("call, match", [
    (lambda: hadamard_matrix(28), "no Hadamard matrix of order 28"),
    (lambda: hadamard_matrix(0), "positive int"),
    (lambda: hadamard_transform(torch.randn(2, 96), 64), "multiple of block_size=64"),
    (lambda: hadamard_transform(torch.randn(2, 84), 28), "no Hadamard matrix of order 28"),
    (lambda: hadamard_transform(torch.randn(2, 64), 0), "positive int"),
    (lambda: hadamard_transform(torch.ones(2, 64, dtype=torch.int32)), "floating-point"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
