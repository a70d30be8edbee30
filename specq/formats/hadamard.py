"""Orthonormal Hadamard matrices and a fast block-diagonal transform along the last dim.

Sizes: n = 2**a * p1 * p2 * ... where each p is a Paley order q + 1 (q a prime, q = 3 mod 4: 4, 8,
12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, ...). That covers every n = 2**a * {1, 12, 20} and their
Kronecker products, e.g. 576 = 12 * 12 * 4, 1536 = 12 * 128, 5120 = 20 * 256.

The matrix is a Kronecker product of small factors, ``H = F1 ⊗ F2 ⊗ ... ⊗ Fm``, each factor
orthonormal (scaled by 1/sqrt(size)):

- the power-of-two part is Sylvester's matrix (H_2n = [[H, H], [H, -H]]), split into factors of at
  most 64 (Sylvester H_{2^(b+c)} = H_{2^b} ⊗ H_{2^c}, so the split does not change the matrix);
- each non-power-of-two part is a Paley type-I matrix of order q + 1.

The transform applies the factors one at a time: with x viewed as [rows, f1, f2, ..., fm],
``x @ (F1 ⊗ ... ⊗ Fm)`` multiplies axis i by F_i. Each step is one batched matmul over a free reshape
(no permutes), so the cost is n * (f1 + ... + fm) multiply-adds instead of n * n, and the number of
torch calls is the number of factors (2 for n = 64*64), not log2(n) butterfly stages. This is a
radix-64 Walsh-Hadamard butterfly: on CPU a 64-point stage as one GEMM beats six radix-2 stages
that each re-read the whole tensor, and the dispatch count matters for one-token decoding.

The matrix for each n is a fixed definition (smallest Paley factors first, then Sylvester): stored
rotated weights depend on it, so it must never change. Factor matrices are cached per (size, dtype,
device). ``hadamard_matrix(n)`` returns the explicit
dense matrix built from the same factors, so ``hadamard_transform(x) == x @ hadamard_matrix(n)``.
"""

from __future__ import annotations

import functools
import math

import torch

from specq.formats._nibbles import cacheable

MAX_RADIX = 64  # power-of-two factors are split into dense blocks of at most this size


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _is_paley_order(p: int) -> bool:
    q = p - 1
    return p % 4 == 0 and not _is_pow2(p) and _is_prime(q) and q % 4 == 3


@functools.lru_cache(maxsize=None)
def _odd_factors(m: int) -> tuple[int, ...] | None:
    """Write m as a product of Paley orders times a power of two: returns the Paley orders or None.

    Smallest orders first: the transform costs n * (sum of factor sizes), so 1536 = 12 * 128 beats
    384 * 4 (383 is also a Paley prime). Paley orders are multiples of 4."""
    if _is_pow2(m):
        return ()
    for p in range(12, m + 1, 4):
        if m % p == 0 and _is_paley_order(p):
            rest = _odd_factors(m // p)
            if rest is not None:
                return (p,) + rest
    return None


def supported(n: int) -> bool:
    """Whether an orthonormal Hadamard matrix of order n can be built here."""
    return isinstance(n, int) and n >= 1 and _odd_factors(n) is not None


@functools.lru_cache(maxsize=None)
def factor_sizes(n: int) -> tuple[int, ...]:
    """The Kronecker factor sizes of H_n, in order (Paley factors first, then powers of two <= 64)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"hadamard: size must be a positive int, got {n!r}")
    odd = _odd_factors(n)
    if odd is None:
        raise ValueError(
            f"hadamard: no Hadamard matrix of order {n} is available; supported orders are "
            f"2**a times products of Paley orders q+1 (q prime, q % 4 == 3), e.g. 2**a, 12*2**a, "
            f"20*2**a, 576 = 12*12*4. Pick a block size that divides the width and is one of these.")
    p2 = n // math.prod(odd)
    sizes = list(odd)
    while p2 > 1:
        f = min(p2, MAX_RADIX)
        sizes.append(f)
        p2 //= f
    return tuple(sizes) if sizes else (1,)


def _jacobsthal_sign(a: int, q: int) -> int:
    """Quadratic character of a mod q: 0, 1 (square) or -1."""
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


@functools.lru_cache(maxsize=None)
def _unnormalized_factor(p: int) -> tuple[tuple[int, ...], ...]:
    """The +-1 matrix of one factor (Sylvester for powers of two, Paley I otherwise), as nested tuples."""
    if _is_pow2(p):
        h = [[1]]
        while len(h) < p:
            h = [row + row for row in h] + [row + [-v for v in row] for row in h]
        return tuple(tuple(r) for r in h)
    q = p - 1
    # Paley I: S = [[0, 1^T], [-1, Q]] with Q[i][j] = chi(j - i) (skew, since q = 3 mod 4); H = I + S.
    h = [[0] * p for _ in range(p)]
    for j in range(1, p):
        h[0][j] = 1
        h[j][0] = -1
    for i in range(q):
        for j in range(q):
            h[i + 1][j + 1] = _jacobsthal_sign(j - i, q)
    for i in range(p):
        h[i][i] += 1
    return tuple(tuple(r) for r in h)


_FACTOR_CACHE: dict = {}


@functools.lru_cache(maxsize=None)
def exact_in_low_precision(n: int) -> bool:
    """Whether every factor's entries +-1/sqrt(p) are powers of two (p = 4**j), i.e. exact in
    bfloat16/float16. Otherwise a low-precision transform runs in float32 (see hadamard_transform)."""
    return all(_is_pow2(p) and p.bit_length() % 2 == 1 for p in factor_sizes(n))


def _factor(p: int, dtype: torch.dtype, device: torch.device, transpose: bool, cache: bool = True) -> torch.Tensor:
    key = (p, dtype, device, transpose)
    f = _FACTOR_CACHE.get(key) if cache else None
    if f is None:
        m = torch.tensor(_unnormalized_factor(p), dtype=torch.float64) / math.sqrt(p)
        if transpose:
            m = m.T
        f = m.to(dtype=dtype, device=device).contiguous()
        if cache and cacheable(f):  # built while tracing (fake tensors): never cache it
            _FACTOR_CACHE[key] = f
    return f


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The orthonormal H_n (H @ H.T = I) that ``hadamard_transform`` multiplies by."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for p in factor_sizes(n):
        h = torch.kron(h, _factor(p, torch.float64, torch.device("cpu"), False))
    return h.to(dtype=dtype, device=device)


def _apply(x2: torch.Tensor, n: int, inverse: bool) -> torch.Tensor:
    """x2 [rows, n] -> x2 @ H_n (or @ H_n.T): apply each Kronecker factor along its own axis."""
    rows = x2.shape[0]
    sizes = factor_sizes(n)
    y = x2
    cache = cacheable(x2)
    left = 1  # product of factor sizes before the current one
    for p in sizes:
        right = n // (left * p)
        f = _factor(p, x2.dtype, x2.device, inverse, cache)
        if right == 1:
            y = (y.reshape(rows * left, p) @ f)
        else:
            # axis of size p sits between (rows*left) and right: y[b, :, r] <- F^T @ y[b, :, r]
            y = torch.matmul(f.T, y.reshape(rows * left, p, right))
        left *= p
    return y.reshape(rows, n)


def hadamard_transform(x: torch.Tensor, block_size: int | None = None, inverse: bool = False) -> torch.Tensor:
    """``x @ H_blockdiag`` along the last dim (``inverse=True``: ``x @ H_blockdiag.T``, which undoes it).

    ``block_size``: size of the diagonal blocks (None: one block spanning the whole last dim); it must
    divide x.shape[-1] and be a supported Hadamard order. Returns x.dtype. bfloat16/float16 inputs are
    computed in x.dtype when the block's entries are exact powers of two (64, 256, ...: 4**j), else in
    float32 with one final rounding.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"hadamard_transform: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0:
        raise ValueError("hadamard_transform: x must have at least one dim, got a scalar")
    k = x.shape[-1]
    bs = k if block_size is None else block_size
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
        raise ValueError(f"hadamard_transform: block_size must be a positive int or None, got {block_size!r}")
    if k % bs != 0:
        raise ValueError(f"hadamard_transform: x.shape[-1] (K={k}) must be a multiple of block_size={bs}")
    factor_sizes(bs)  # raises a clear error for unsupported orders
    if x.numel() == 0:
        return x.clone()
    x2 = x.reshape(-1, bs)
    if x.dtype in (torch.bfloat16, torch.float16) and not exact_in_low_precision(bs):
        # 1/sqrt(12) or 1/sqrt(2) rounded to bf16 would scale the whole rotation by a constant off
        # by up to 2**-9 per factor (the weights were rotated in float32): compute in float32 and
        # round once at the end instead. Blocks like 64 or 256 (entries +-1/8, +-1/16) stay in x.dtype.
        return _apply(x2.float(), bs, inverse).to(x.dtype).reshape(x.shape)
    return _apply(x2, bs, inverse).reshape(x.shape)
