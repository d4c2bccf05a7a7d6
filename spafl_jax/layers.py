"""Masked Dense and Conv layers (Flax linen) whose thresholds live in their own `thresholds` collection.

A masked layer has no bias. Its kernel is masked row-wise by `masking.masked_kernel` before use; the
threshold vector has one entry per output feature and starts at 0.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spafl_jax import masking

THRESHOLDS = 'thresholds'  # variable collection holding one threshold vector per masked layer
MACS = 'macs'  # collection a layer sows its multiply-accumulates per example into

# PyTorch's default layer init: kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


# 'SAME', 'VALID', one int for every side, or ((top, bottom), (left, right)). Explicit integers give
# PyTorch's alignment: TF's 'SAME' with stride 2 on an even input pads 0 before and 1 after, PyTorch's
# padding=1 pads 1 on both sides, so the sampled pixels differ.
Padding = str | int | Sequence[tuple[int, int]]


def explicit_padding(padding: Padding) -> str | tuple[tuple[int, int], tuple[int, int]]:
    """A padding string unchanged, or the ((top, bottom), (left, right)) pairs an int stands for."""
    if isinstance(padding, str):
        if padding not in ('SAME', 'VALID'):
            raise ValueError(
                f'padding={padding!r}: use "SAME", "VALID", an int or ((t, b), (l, r)).'
            )
        return padding
    if isinstance(padding, (int, np.integer)):
        return ((int(padding), int(padding)), (int(padding), int(padding)))
    pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pairs) != 2:
        raise ValueError(f'padding={padding!r}: need one (low, high) pair per spatial axis.')
    return pairs


def _matmul(x, w, dtype):
    if dtype is None:
        return x @ w
    # Low-precision inputs with float32 accumulation: what AMX on CPU and the TPU MXU want.
    return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _threshold(module: nn.Module, features: int) -> jax.Array:
    return module.variable(THRESHOLDS, 'threshold', jnp.zeros, (features,), jnp.float32).value


class MaskedDense(nn.Module):
    """Dense layer `y = x @ (W * m)`, m the row mask of W against the layer's thresholds.

    `x` is [batch, ..., in]; any middle axes (tokens) are kept and count towards the sown MACs.
    """

    features: int
    estimator: str = 'long_tailed'
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param('kernel', torch_default_init, (x.shape[-1], self.features), jnp.float32)
        threshold = _threshold(self, self.features)
        # Per example: every position of the middle axes (e.g. a ViT's tokens) does its own product.
        positions = int(np.prod(x.shape[1:-1]))
        self.sow(MACS, 'macs', np.float32(positions * x.shape[-1] * self.features))
        return _matmul(
            x, masking.masked_kernel(kernel, threshold, self.estimator), self.compute_dtype
        )


# Activation layouts a masked conv takes and returns. NHWC is Flax's; CNHW (channels, batch, height,
# width) makes the im2col matmul `kernel^T @ patches` with the long batch x pixels axis minor, which
# on XLA:CPU spares the transposes of NHWC's gradient and pools on contiguous rows (BENCHMARKS.md).
LAYOUTS = ('NHWC', 'CNHW')


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f'layout={layout!r}: use one of {LAYOUTS}.')


def spatial_axes(layout: str) -> tuple[int, int]:
    """The (height, width) axes of an activation in `layout`."""
    check_layout(layout)
    return (1, 2) if layout == 'NHWC' else (2, 3)


def channel_axis(layout: str) -> int:
    check_layout(layout)
    return -1 if layout == 'NHWC' else 0


def _pad_spatial(
    x: jax.Array, kernel_hw: tuple[int, int], strides: Sequence[int], padding: Padding, layout: str
) -> jax.Array:
    """`x` with the explicit or 'SAME' zero padding applied to its spatial axes."""
    padding = explicit_padding(padding)
    h_axis, w_axis = spatial_axes(layout)
    if padding == 'VALID':
        return x
    if padding == 'SAME':
        pairs = []
        for size, k, s in zip((x.shape[h_axis], x.shape[w_axis]), kernel_hw, strides):
            pad = max((-(-size // s) - 1) * s + k - size, 0)
            pairs.append((pad // 2, pad - pad // 2))
        padding = tuple(pairs)
    widths = [(0, 0)] * x.ndim
    widths[h_axis], widths[w_axis] = padding
    return jnp.pad(x, widths)


def im2col_conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int],
    padding: Padding,
    dtype=None,
    layout: str = 'NHWC',
) -> jax.Array:
    """Convolution as shifted slices concatenated on the channel axis and one matmul.

    On XLA:CPU this runs about 1.5x faster than `lax.conv_general_dilated` for the 5x5 convolutions of
    the SpaFL models (BENCHMARKS.md), and vmapped over clients it becomes a batched matmul rather than a
    grouped convolution. `x` and the result are in `layout` ('NHWC' or 'CNHW'); the kernel is HWIO in
    both, and the patches' feature order matches its reshape.
    """
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    x = _pad_spatial(x, (kh, kw), strides, padding, layout)
    h_axis, w_axis = spatial_axes(layout)
    h, w = x.shape[h_axis], x.shape[w_axis]
    out_h, out_w = (h - kh) // sh + 1, (w - kw) // sw + 1

    if layout == 'NHWC':
        patches = [
            x[:, i : i + (out_h - 1) * sh + 1 : sh, j : j + (out_w - 1) * sw + 1 : sw, :]
            for i in range(kh)
            for j in range(kw)
        ]
        patches = jnp.concatenate(patches, axis=-1) if len(patches) > 1 else patches[0]
        return _matmul(patches, kernel.reshape(kh * kw * cin, cout), dtype)
    # CNHW: the kh row shifts, then the kw column shifts of those, each concatenated on the major
    # axis. That is kh + kw slices instead of kh * kw (a LeNet-5 forward at batch 32 ran 1.3x faster:
    # XLA:CPU runs every slice as its own kernel), with the features in (column, row, channel) order.
    rows = [x[:, :, i : i + (out_h - 1) * sh + 1 : sh, :] for i in range(kh)]
    rows = jnp.concatenate(rows, axis=0) if kh > 1 else rows[0]
    patches = [rows[..., j : j + (out_w - 1) * sw + 1 : sw] for j in range(kw)]
    patches = jnp.concatenate(patches, axis=0) if kw > 1 else patches[0]
    n = patches.shape[1]
    weights = kernel.transpose(1, 0, 2, 3).reshape(kh * kw * cin, cout)
    y = _matmul(weights.T, patches.reshape(kh * kw * cin, n * out_h * out_w), dtype)
    return y.reshape(cout, n, out_h, out_w)


def xla_conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int],
    padding: Padding,
    dtype=None,
    layout: str = 'NHWC',
) -> jax.Array:
    """`lax.conv_general_dilated` with the layouts and padding conventions of `im2col_conv`."""
    check_layout(layout)
    padding = explicit_padding(padding)
    if dtype is not None:
        x, kernel = x.astype(dtype), kernel.astype(dtype)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        tuple(strides),
        padding,
        dimension_numbers=(layout, 'HWIO', layout),
        preferred_element_type=jnp.float32 if dtype is not None else None,
    )


CONV_IMPLS = {'im2col': im2col_conv, 'xla': xla_conv}


class MaskedConv(nn.Module):
    """2-D convolution (kernel [kh, kw, in, out]) with a row-masked kernel and no bias.

    Activations are NHWC, or CNHW with `layout='CNHW'`; the parameters are the same in both. The
    convolution is `lax.conv` ('xla'), or patches times a matrix ('im2col', faster on CPU).
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Padding = 'VALID'  # explicit ints for PyTorch alignment with stride > 1
    estimator: str = 'long_tailed'
    conv_impl: str = 'xla'
    compute_dtype: Any = None
    layout: str = 'NHWC'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        cin = x.shape[channel_axis(self.layout)]
        kernel = self.param('kernel', torch_default_init, (kh, kw, cin, self.features), jnp.float32)
        threshold = _threshold(self, self.features)
        y = CONV_IMPLS[self.conv_impl](
            x,
            masking.masked_kernel(kernel, threshold, self.estimator),
            strides=self.strides,
            padding=self.padding,
            dtype=self.compute_dtype,
            layout=self.layout,
        )
        pixels = np.prod([y.shape[a] for a in spatial_axes(self.layout)])
        self.sow(MACS, 'macs', np.float32(pixels * kh * kw * cin * self.features))
        return y
