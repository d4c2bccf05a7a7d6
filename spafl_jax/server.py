"""The server side of SpaFL: threshold aggregation and the aggregated-importance update of weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spafl_jax import masking


def ordered_sum(values, weights: jax.Array, order: jax.Array | None = None):
    """sum_i weights[i] * values[i] over the leading axis of every leaf, added one entry at a time
    in index order (or in `order`, indices into that axis): the same bits for the same entries
    whatever program, batch or device count computed them (a `psum` or a tree reduction adds in an
    order that depends on those). A loop reading one entry per step, not a scan over a reordered
    copy: on XLA:CPU that copy and scan cost 12x more for a LeNet-5-sized message."""
    count = weights.shape[0] if order is None else order.shape[0]

    def add(i, total):
        j = i if order is None else order[i]
        take = lambda x: jax.lax.dynamic_index_in_dim(x, j, keepdims=False)
        return jax.tree.map(lambda t, x: t + take(weights) * take(x), total, values)

    zeros = jax.tree.map(
        lambda x: jnp.zeros(x.shape[1:], jnp.result_type(x.dtype, weights.dtype)), values
    )
    return jax.lax.fori_loop(0, count, add, zeros)


def aggregate(
    client_thresholds,
    weights: jax.Array | None = None,
    axis_name: str | None = None,
    order: jax.Array | None = None,
):
    """Weighted mean of `[clients, ...]` thresholds over the leading client axis, summed in a fixed
    order (`ordered_sum`), so the mean is the same whatever the device count.

    With `axis_name` the client axis is sharded: each shard passes its own clients, which are
    gathered (tiled) along the axis first. `order` ([S] indices into the, gathered, client axis)
    gives the summation order; the runners pass the sampled clients in client-id order
    (`algorithm.client_order`). Empty positions carry weight 0.
    """
    if weights is None:
        weights = jnp.ones((jax.tree.leaves(client_thresholds)[0].shape[0],), jnp.float32)
    weights = weights.astype(jnp.float32)
    if axis_name is not None:
        client_thresholds, weights = jax.lax.all_gather(
            (client_thresholds, weights), axis_name, tiled=True
        )
    total = ordered_sum(weights, jnp.ones_like(weights), order)
    summed = ordered_sum(client_thresholds, weights, order)
    return jax.tree.map(lambda s: s / total, summed)


def importance_normalizer(kernel_shape) -> int:
    """D of docs/algorithm.md, section 3, step 6: kh*kw for a conv kernel, fan_in for a dense one."""
    if len(kernel_shape) == 2:
        return kernel_shape[0]
    size = 1
    for d in kernel_shape[:-2]:
        size *= d
    return size


def importance_update(params, delta):
    """W[..., i] -= sign(sum_j W[..., i]) * delta_i / D for every masked layer of one client.

    A rising threshold (delta > 0) shrinks each row's magnitude by moving it towards zero along the
    sign of its signed sum, so the server's change in thresholds reaches the weights of every client.
    """

    def update(kernel, d):
        sign = jnp.sign(jnp.sum(kernel, axis=tuple(range(kernel.ndim - 1))))
        return kernel - sign * d / importance_normalizer(kernel.shape)

    kernels = masking.kernels_of(params, delta)
    return masking.replace_kernels(params, jax.tree.map(update, kernels, delta))


# ------------------------------------------------------------------------------------------------
# The same update, lazily: two numbers per row instead of every weight (docs/algorithm.md, §3).
#
# `importance_update` moves every element of row i by the same amount, sign(s_i) delta_i / D, where
# s_i is the row's sum. So the row's sum follows a scalar recurrence, s_i <- s_i - n sign(s_i)
# delta_i / D (n elements in the row), and the row itself is the kernel it started from minus the
# shift accumulated since, A_i <- A_i + sign(s_i) delta_i / D. Keeping (s, A) per client and row
# gives every client's weights after any number of rounds without touching them: `kernel - A` when
# a client is gathered or evaluated. It equals the eager update up to float32 rounding (the eager
# form rounds each element every round; this one rounds A): the signs agree wherever a row's sum is
# not within rounding of zero, where the eager form's own sign is decided by rounding too.


def row_sums(params, thresholds):
    """Each masked layer's row sums, shaped like `thresholds` (the `s` of the lazy update)."""
    return jax.tree.map(
        lambda k: jnp.sum(k, axis=tuple(range(k.ndim - 1))), masking.kernels_of(params, thresholds)
    )


def lazy_importance_update(sums, shifts, delta, kernels):
    """One round of `importance_update` on (row sums, shifts) instead of the kernels.

    `kernels` gives each masked layer's kernel (only its shape is read: n and D); every argument
    is shaped like the thresholds. Returns the new (sums, shifts).
    """

    def update(s, a, d, kernel):
        step = jnp.sign(s) * d / importance_normalizer(kernel.shape)
        return s - (kernel.size // kernel.shape[-1]) * step, a + step

    updated = jax.tree.map(update, sums, shifts, delta, kernels)
    first = lambda pair: isinstance(pair, tuple)  # noqa: E731
    return (
        jax.tree.map(lambda p: p[0], updated, is_leaf=first),
        jax.tree.map(lambda p: p[1], updated, is_leaf=first),
    )


def apply_shifts(params, shifts):
    """The weights the lazy update stands for: each masked kernel minus its rows' shifts."""
    kernels = masking.kernels_of(params, shifts)
    return masking.replace_kernels(params, jax.tree.map(jnp.subtract, kernels, shifts))
