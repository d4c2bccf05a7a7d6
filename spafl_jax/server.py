"""The server side of SpaFL: threshold aggregation and the aggregated-importance update of weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spafl_jax import masking


def aggregate(client_thresholds, weights: jax.Array | None = None, axis_name: str | None = None):
    """Weighted mean of `[clients, ...]` thresholds over the leading client axis.

    With `axis_name`, the client axis is sharded and the sums become `psum`s over it, i.e. a `pmean`
    (weighted) across devices and hosts; each shard passes its own clients.
    """
    if weights is None:
        weights = jnp.ones((jax.tree.leaves(client_thresholds)[0].shape[0],), jnp.float32)
    weights = weights.astype(jnp.float32)
    total = jnp.sum(weights)
    summed = jax.tree.map(lambda t: jnp.tensordot(weights, t, axes=1), client_thresholds)
    if axis_name is not None:
        summed, total = jax.lax.psum((summed, total), axis_name)
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
