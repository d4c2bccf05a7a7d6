"""The pieces the SpaFL models (`models`) are built from: PyTorch's BatchNorm, the 2x2 max pool,
PyTorch's default Linear for the unmasked layers, and `MaskedNet`, the fields every model takes and
the factories of its masked layers.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spafl_jax.layers import MaskedConv, MaskedDense, spatial_axes, torch_default_init


class BatchNorm(nn.Module):
    """BatchNorm as PyTorch computes it (`nn.BatchNorm1d/2d`, momentum 0.1, eps 1e-5).

    Training normalizes with the biased batch variance and updates the running variance with the
    unbiased one (times n / (n - 1), n the values per feature), which `flax.linen.BatchNorm` does
    not: with the official batch of 16, its dense layers' running variance would be 16/15 too
    small at evaluation. Variables and names are those of `flax.linen.BatchNorm` (`params`: scale,
    bias; `batch_stats`: mean, var), so checkpoints and exports do not change. tests/test_reference
    holds it to the official CIFAR-10 code.
    """

    use_running_average: bool
    axis: int = -1
    momentum: float = 0.9  # Flax convention: PyTorch's momentum 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axis = self.axis % x.ndim
        features = x.shape[axis]
        reduce = tuple(a for a in range(x.ndim) if a != axis)
        shape = [1] * x.ndim
        shape[axis] = features
        scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
        running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            mean = jnp.mean(x, axis=reduce)
            var = jnp.mean(jnp.square(x - mean.reshape(shape)), axis=reduce)
            if not self.is_initializing():
                n = x.size // features
                m = self.momentum
                running_mean.value = m * running_mean.value + (1.0 - m) * mean
                running_var.value = m * running_var.value + (1.0 - m) * var * (n / max(n - 1, 1))
        y = (x - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + self.epsilon)
        return y * scale.reshape(shape) + bias.reshape(shape)


def _batch_norm(train: bool, axis: int = -1, name: str | None = None) -> BatchNorm:
    return BatchNorm(use_running_average=not train, axis=axis, name=name)


def max_pool_2x2(x: jax.Array, layout: str = 'NHWC') -> jax.Array:
    """2x2 max pooling with stride 2 over the spatial axes of `layout` (VALID: an odd last row or
    column is dropped).

    The values are those of `nn.max_pool(x, (2, 2), strides=(2, 2))`. Written as a reshape and a
    max-reduction because `nn.max_pool`'s gradient is a select-and-scatter that XLA:CPU runs as a
    slow loop: this made a LeNet-5 training step 1.33x faster here (BENCHMARKS.md, "Layouts and
    YNNPACK"; hand-written custom_vjp gradients measured slower inside the whole step). The gradients
    differ only on exact ties inside a window, which the reduction splits evenly where `nn.max_pool`
    picks one entry. Our models pool right before or after a ReLU, whose gradient is zero on the
    windows of non-positive values where ties happen, so the gradients are equal up to ties between
    positive floats.
    """
    h_axis, w_axis = spatial_axes(layout)
    h, w = x.shape[h_axis], x.shape[w_axis]
    index = [slice(None)] * x.ndim
    index[h_axis], index[w_axis] = slice(0, h - h % 2), slice(0, w - w % 2)
    x = x[tuple(index)]
    # Columns, then rows: two reductions over pairs. Their gradients ran faster than one reduction
    # over the 2x2 window (whose tie count is a strided reduce), 1.12x for a CNHW LeNet-5 step.
    shape = list(x.shape)
    shape[w_axis : w_axis + 1] = [w // 2, 2]
    x = x.reshape(shape).max(axis=w_axis + 1)
    shape = list(x.shape)
    shape[h_axis : h_axis + 1] = [h // 2, 2]
    return x.reshape(shape).max(axis=h_axis + 1)


def _torch_bias_init(fan_in: int):
    # PyTorch's Linear/Conv bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / fan_in**0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


def _torch_dense(features: int, fan_in: int, name: str | None = None) -> nn.Dense:
    """An unmasked Linear with PyTorch's default init (heads and embeddings are never masked)."""
    return nn.Dense(
        features, kernel_init=torch_default_init, bias_init=_torch_bias_init(fan_in), name=name
    )


class MaskedNet(nn.Module):
    """The fields every model takes (see `create_model`) and factories of its masked layers.

    A model is a plain Flax module: `__call__(x, train)` takes NHWC images and returns logits; its
    parameters, thresholds and outputs are the same whatever the three fields below, which choose
    only how it runs:
      conv_impl: 'xla' (`lax.conv`, the default: what GPUs and TPUs run fastest) or 'im2col'
        (patches times a matrix: several times faster inside XLA:CPU's loops).
      layout: the activation layout of the conv stack ('NHWC', the default, or 'CNHW', see
        `layers.LAYOUTS`); images come in NHWC and features are flattened in NHWC order whatever it
        is.
      xla_cpu_ynnpack: whether XLA:CPU may hand this model's dots, reductions and elementwise code
        to YNNPACK (its default) in the programs `hardware.jit` compiles for it.
    `specialize(model, backend)` sets the values measured fastest on the backend (on CPU:
    `CPU_SETTINGS`, BENCHMARKS.md "Layouts and YNNPACK"); `create_model`, which the runner uses,
    applies it for the backend JAX runs on.
    """

    num_classes: int = 10
    estimator: str = 'long_tailed'
    conv_impl: str = 'xla'
    compute_dtype: Any = None
    layout: str = 'NHWC'
    xla_cpu_ynnpack: bool = True

    def masked_layers(self, **conv_kwargs):
        """(conv, dense): `MaskedConv` / `MaskedDense` constructors with this model's settings."""
        conv = functools.partial(
            MaskedConv,
            estimator=self.estimator,
            conv_impl=self.conv_impl,
            compute_dtype=self.compute_dtype,
            layout=self.layout,
            **conv_kwargs,
        )
        dense = functools.partial(
            MaskedDense, estimator=self.estimator, compute_dtype=self.compute_dtype
        )
        return conv, dense

    def from_nhwc(self, x: jax.Array) -> jax.Array:
        """NHWC images in this model's layout."""
        return x if self.layout == 'NHWC' else x.transpose(3, 0, 1, 2)

    def flatten(self, x: jax.Array) -> jax.Array:
        """Activations in this model's layout as [batch, features] in NHWC order (the dense layer's
        rows are (row, column, channel) whatever the layout)."""
        x = x if self.layout == 'NHWC' else x.transpose(1, 2, 3, 0)
        return x.reshape(x.shape[0], -1)

    def pool(self, x: jax.Array) -> jax.Array:
        return max_pool_2x2(x, self.layout)
