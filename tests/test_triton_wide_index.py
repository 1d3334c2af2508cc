"""The Triton kernels' 64-bit index plan on geometry whose int32 size products wrap (kernels/conv_relu.py's docstring).

The H200's large-tensor run (bench/results/h200-run12-3e1f6d3-large.txt) found the Triton conv forward reading out of
bounds on a 1 x 1 x 46341^2 map: its 64-bit plan split the flat pixel index as ``m // (OW * OH)``, and OW * OH, two
int32 sizes, wrapped in int32. The interpreter wraps int32 arithmetic as a GPU does (checked first below), so these
tests run the kernels themselves on the CPU at claimed sizes whose products wrap, without allocating them: a plane of
2**26 + 1 rows of 64 pixels (OW * OH = 2**32 + 64, 64 in int32) over real buffers that hold only the few rows the
launched programs touch, with a second image behind them that a wrongly split index would read or write.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from fcnkern.kernels import conv_relu as k  # noqa: E402

from fcnkern.conv_relu import _acc, _dot_precision  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TALL = 2**26 + 1  # rows of a claimed plane: TALL * 64 = 2**32 + 64, which int32 arithmetic wraps to 64
WIDE = 64


@triton.jit
def _image_kernel(m_ptr, out_ptr, OH, OW, INDEX: tl.constexpr, WIDE_PRODUCT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = tl.load(m_ptr + i).to(INDEX)
    # WIDE_PRODUCT: the kernels' form since run 12; else the form they had, the product of two int32 sizes in int32
    n = m // (tl.cast(OW, INDEX) * OH) if WIDE_PRODUCT else m // (OW * OH)
    tl.store(out_ptr + i, n.to(tl.int64))


def _image_of(m: list[int], oh: int, ow: int, wide_product: bool) -> list[int]:
    block = 8
    flat = torch.tensor(m + [0] * (block - len(m)), dtype=torch.int64, device=DEVICE)
    out = torch.full((block,), -7, dtype=torch.int64, device=DEVICE)
    _image_kernel[(1,)](flat, out, oh, ow, INDEX=tl.int64, WIDE_PRODUCT=wide_product, BLOCK=block)
    return out[: len(m)].cpu().tolist()


def test_int32_size_products_wrap_in_the_kernels():
    """The premise of this file: a product of two int32 kernel arguments wraps (in the interpreter as on a GPU), so
    the tests below reach the failure mode. 46341^2 = 2**31 + 4633 wraps negative: the old split of a pixel index just
    below it gave image -1, as the Triton conv forward did on the H200; the product taken in int64 gives 0."""
    m = [0, 46341**2 - 5, 46341**2 + 7]
    assert _image_of(m, 46341, 46341, wide_product=False)[1] == -1
    assert _image_of(m, 46341, 46341, wide_product=True) == [0, 0, 1]


def _nan_like(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.full(shape, float("nan"), device=DEVICE)


def _geometry() -> tuple[int, ...]:
    return (1, 1, 0, 0, 1, 1)  # stride, padding, dilation: a 3 x 3 valid convolution


@pytest.mark.parametrize("channels", [1, 16], ids=["flat", "per-tap"])
def test_conv_forward_splits_output_pixels_past_int32_products(channels):
    """Output plane TALL x 64 (pixels m = oh * 64 + ow); two programs of 64 pixels write output rows 0 and 1. The
    wrapped split put row 1 in image 1."""
    g = torch.Generator().manual_seed(3)
    cout = 8
    x = torch.randn(2, channels, 4, WIDE + 2, generator=g).to(DEVICE)  # rows 0-3 of each image; H is TALL + 2
    w = torch.randn(cout, channels, 3, 3, generator=g).to(DEVICE)
    b = torch.randn(cout, generator=g).to(DEVICE)
    y = _nan_like((2, cout, 2, WIDE))
    bm, bn, bk, warps = k.pick_blocks(cout, 4)
    flat = channels < k.FLAT_K_BELOW
    assert bm == 64
    k.conv_fwd_kernel[(2, triton.cdiv(cout, bn), 1)](
        x, w, b, y,
        TALL * WIDE, channels, TALL + 2, WIDE + 2, cout, TALL, WIDE,
        *x.stride(), *w.stride(), *y.stride(), *_geometry(), 3, 3, True,
        FLAT_K=flat, ACC=_acc(x.dtype), INDEX=tl.int64, DOT_PRECISION=_dot_precision(x),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=k.fwd_block_k(flat, bk, 4), num_warps=warps,
    )  # fmt: skip
    want = F.relu(F.conv2d(x[:1].double(), w.double(), b.double())).float()
    torch.testing.assert_close(y[:1], want, rtol=1e-5, atol=1e-5)
    assert y[1].isnan().all(), "a program wrote into the second image"


def test_conv_input_gradient_splits_input_pixels_past_int32_products():
    """Input plane TALL x 64; two programs of 64 input pixels write dx rows 0 and 1, which only output rows 0 and 1
    reach. The wrapped split put input row 1 in image 1."""
    g = torch.Generator().manual_seed(4)
    cin, cout = 3, 8
    dy = torch.randn(2, cout, 2, WIDE - 2, generator=g).to(DEVICE)  # output rows 0-1; OH is TALL - 2
    y = torch.randn(2, cout, 2, WIDE - 2, generator=g).to(DEVICE)  # the saved output: its sign masks dy
    w = torch.randn(cout, cin, 3, 3, generator=g).to(DEVICE)
    dx = _nan_like((2, cin, 2, WIDE))
    bm, bn, bk, warps = k.pick_blocks(cin, 4)
    k.conv_dgrad_kernel[(2, triton.cdiv(cin, bn), 1)](
        dy, y, w, dx,
        TALL * WIDE, cin, TALL, WIDE, cout, TALL - 2, WIDE - 2,
        *dy.stride(), *w.stride(), *dx.stride(), *_geometry(), 3, 3, True,
        ACC=_acc(dx.dtype), INDEX=tl.int64, DOT_PRECISION=_dot_precision(dx),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    masked = torch.where(y[:1] > 0, dy[:1], 0.0).double()
    # A 4-row input band: its rows 0 and 1 get every tap from output rows 0 and 1.
    want = torch.nn.grad.conv2d_input((1, cin, 4, WIDE), w.double(), masked)[:, :, :2].float()
    torch.testing.assert_close(dx[:1], want, rtol=1e-5, atol=1e-5)
    assert dx[1].isnan().all(), "a program wrote into the second image"


@pytest.mark.parametrize("channels", [1, 16], ids=["flat", "per-tap"])
def test_conv_weight_gradient_splits_output_pixels_past_int32_products(channels):
    """The weight gradient's pixel reduction over the first 128 pixels (output rows 0 and 1) of a TALL x 64 plane.
    The wrapped split read row 1's dy and x from the second image."""
    g = torch.Generator().manual_seed(5)
    cout = 8
    x = torch.randn(2, channels, 4, WIDE + 2, generator=g).to(DEVICE)
    dy = torch.randn(2, cout, 2, WIDE, generator=g).to(DEVICE)
    y = torch.randn(2, cout, 2, WIDE, generator=g).to(DEVICE)
    bm, bn, bk, warps = k.wgrad_blocks(4)
    flat = channels < k.FLAT_K_BELOW
    j = channels * 9
    j_blocks = triton.cdiv(j, bn) if flat else 9 * triton.cdiv(channels, bn)
    dw = _nan_like((1, cout, j))
    db = _nan_like((1, cout))
    pixels = 2 * WIDE
    k.conv_wgrad_kernel[(triton.cdiv(cout, bm), j_blocks, 1)](
        dy, y, x, dw, db,
        pixels, channels, TALL + 2, WIDE + 2, cout, TALL, WIDE, 1, pixels,
        *dy.stride(), *x.stride(), *_geometry(), 3, 3, True, True,
        ACC=_acc(x.dtype), INDEX=tl.int64, FLAT_J=flat, DOT_PRECISION=_dot_precision(x),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    masked = torch.where(y[:1] > 0, dy[:1], 0.0).double()
    want_w = torch.nn.grad.conv2d_weight(x[:1].double(), (cout, channels, 3, 3), masked).float()
    got_w = dw[0].reshape(cout, channels, 3, 3) if flat else dw[0].reshape(cout, 3, 3, channels).permute(0, 3, 1, 2)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(db[0], masked.sum((0, 2, 3)).float(), rtol=1e-5, atol=1e-4)


def test_upsample_forward_splits_kept_pixels_past_int32_products():
    """The learned upsampling's CUDA-core forward (k4 s2, no crop) on a kept window TALL x 64: two programs of 64
    pixels write its rows 0 and 1, which input row 0 alone reaches. The wrapped bounds check N * OH * OW dropped row
    1."""
    from fcnkern.kernels import upsample as u

    g = torch.Generator().manual_seed(6)
    cin, cout = 3, 2
    x = torch.randn(2, cin, 2, WIDE // 2 + 1, generator=g).to(DEVICE)  # rows 0-1; H is TALL
    w = torch.randn(cin, cout, 4, 4, generator=g).to(DEVICE)
    b = torch.randn(cout, generator=g).to(DEVICE)
    out = _nan_like((2, cout, 2, WIDE))
    bm, bn, bk, warps = u.learned_blocks(TALL * WIDE, cout, 4, False)
    assert bm == 64
    u.upsample_fwd_direct_kernel[(2, triton.cdiv(cout, bn))](
        x, w, b, out,
        1, cin, TALL, WIDE // 2 + 1, cout, TALL, WIDE,
        *x.stride(), *w.stride(), *out.stride(),
        2, 2, 0, 0, 4, 4, TALL, True,
        ACC=_acc(x.dtype), INDEX=tl.int64, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    want = F.conv_transpose2d(x[:1].double(), w.double(), b.double(), stride=2)[:, :, :2, :WIDE].float()
    torch.testing.assert_close(out[:1], want, rtol=1e-5, atol=1e-5)
    assert out[1].isnan().all(), "a program wrote into the second image"


def test_bilinear_refuses_more_rows_than_its_int32_row_index():
    """The Triton bilinear passes number rows (n, c, y) in int32; past that, a clear error instead of a wrapped row."""
    from fcnkern.upsample import _check_bilinear_rows

    _check_bilinear_rows(8, 21, 512)  # no error
    with pytest.raises(ValueError, match="split the batch"):
        _check_bilinear_rows(1, 21, 2**27)


def test_upsample_cell_forward_splits_cells_past_int32_products():
    """The learned upsampling's tensor-core forward (k4 s2, 8 channels) over cells of a claimed TALL x 64 grid (one
    cell = a 2 x 2 block of output): two programs of 64 cells compute cell rows 0 and 1, output rows 0-3, which input
    rows 0 and 1 reach. The wrapped split put cell row 1 in image 1 and its bounds check dropped it."""
    from fcnkern.kernels import upsample as u

    from fcnkern.upsample import _cell_weight

    g = torch.Generator().manual_seed(7)
    ch = 8
    x = torch.randn(2, ch, 2, WIDE, generator=g).to(DEVICE)  # rows 0-1; H is TALL
    w = torch.randn(ch, ch, 4, 4, generator=g).to(DEVICE)
    out = _nan_like((2, ch, 4, 2 * WIDE))
    a = _cell_weight(w, 1, (2, 2), (2, 2))
    bm, bn, bk, warps = u.cell_blocks(4)["fwd"]
    assert bn == 64
    u.upsample_fwd_cells_kernel[(2, triton.cdiv(a.shape[1], bm), 1)](
        a, x, a, out,
        1, ch, TALL, WIDE, ch, 2 * TALL, 2 * WIDE,
        *x.stride(), *out.stride(),
        2, 2, 0, 0, 2, 2, TALL, WIDE, False,
        ACC=_acc(x.dtype), INDEX=tl.int64, DOT_PRECISION=_dot_precision(x),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    want = F.conv_transpose2d(x[:1].double(), w.double(), stride=2)[:, :, :4, : 2 * WIDE].float()
    torch.testing.assert_close(out[:1], want, rtol=1e-5, atol=1e-5)
    assert out[1].isnan().all(), "a program wrote into the second image"
