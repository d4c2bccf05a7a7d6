"""The SpaFL mask rule: one trainable threshold per output row, a hard step forward, an estimator backward.

Everything about which rows of a kernel survive lives here, so layers, the server and the metrics agree
on one definition.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from flax import traverse_util
import jax
import jax.numpy as jnp

Array = jax.Array


def _long_tailed(x: Array) -> Array:
    # Dynamic Sparse Training (Liu et al., 2020): a triangle near 0 with a long flat tail.
    ax = jnp.abs(x)
    return jnp.where(ax <= 0.4, 2.0 - 4.0 * ax, jnp.where(ax <= 1.0, 0.4, 0.0))


def _identity(x: Array) -> Array:
    return jnp.ones_like(x)


def _outside_unit(x: Array) -> Array:
    return (jnp.abs(x) > 1.0).astype(x.dtype)


ESTIMATORS: dict[str, Callable[[Array], Array]] = {
    'long_tailed': _long_tailed,
    'identity': _identity,
    'outside_unit': _outside_unit,
}


def check_estimator(name: str) -> None:
    if name not in ESTIMATORS:
        raise ValueError(
            f'estimator={name!r} is not known; allowed values: {", ".join(sorted(ESTIMATORS))}.'
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def step(x: Array, estimator: str = 'long_tailed') -> Array:
    """Heaviside step `1[x > 0]` whose backward pass is `estimator(x) * g`."""
    return (x > 0).astype(x.dtype)


def _step_fwd(x, estimator):
    return step(x, estimator), x


def _step_bwd(estimator, x, g):
    return (ESTIMATORS[estimator](x) * g,)


step.defvjp(_step_fwd, _step_bwd)


def row_magnitude(kernel: Array) -> Array:
    """Mean |w| of each output row: reduces every axis but the last (Flax layout)."""
    return jnp.mean(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)))


def row_mask(kernel: Array, threshold: Array, estimator: str = 'long_tailed') -> Array:
    """Mask of shape [out]: 1 where a row's mean magnitude is strictly above its threshold."""
    return step(row_magnitude(kernel) - threshold, estimator)


def masked_kernel(kernel: Array, threshold: Array, estimator: str = 'long_tailed') -> Array:
    """The kernel the forward pass uses: pruned rows are zero."""
    return kernel * row_mask(kernel, threshold, estimator)


def hard_row_mask(kernel: Array, threshold: Array) -> Array:
    """Boolean mask without any gradient machinery (metrics, export, resets)."""
    return row_magnitude(kernel) > threshold


COLLAPSE_DENSITY = 0.01


def collapsed(kernel: Array, threshold: Array) -> Array:
    """Whether the layer's mask keeps at most 1 % of its rows (the official reset's trigger)."""
    return jnp.mean(hard_row_mask(kernel, threshold).astype(jnp.float32)) <= COLLAPSE_DENSITY


def reset_collapsed(kernel: Array, threshold: Array) -> Array:
    """Thresholds reset to 0 when at most 1 % of the layer's rows survive (official code)."""
    return reset_if(collapsed(kernel, threshold), threshold)


def reset_if(flag: Array, threshold: Array) -> Array:
    """`threshold`, or zeros where the scalar `flag` is set."""
    return jnp.where(flag, jnp.zeros_like(threshold), threshold)


# ----------------------------------------------------------------------------------------------------
# Pairing thresholds with kernels. A masked layer's `thresholds/.../threshold` sits at the same module
# path as its `params/.../kernel`; these helpers walk that pairing for whole models.


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


def kernels_of(params, thresholds):
    """A pytree shaped like `thresholds` holding each masked layer's kernel."""
    flat_params = _flat(params)
    return traverse_util.unflatten_dict(
        {path: flat_params[path[:-1] + ('kernel',)] for path in _flat(thresholds)}
    )


def replace_kernels(params, kernels):
    """`params` with the masked layers' kernels replaced by those in `kernels` (shaped like thresholds)."""
    flat = dict(_flat(params))
    for path, kernel in _flat(kernels).items():
        flat[path[:-1] + ('kernel',)] = kernel
    return traverse_util.unflatten_dict(flat)


def layer_names(thresholds) -> list[str]:
    """'/'-joined module paths of the masked layers, in pytree order."""
    return ['/'.join(path[:-1]) for path in _flat(thresholds)]


def reset_collapsed_thresholds(params, thresholds):
    """Applies `reset_collapsed` to every masked layer of one model."""
    return jax.tree.map(reset_collapsed, kernels_of(params, thresholds), thresholds)


def collapsed_layers(params, thresholds):
    """One boolean scalar per masked layer (shaped like `thresholds`): `collapsed` of its mask."""
    return jax.tree.map(collapsed, kernels_of(params, thresholds), thresholds)


def reset_flagged(flags, thresholds):
    """Thresholds of the layers whose flag (from `collapsed_layers`) is set, reset to 0."""
    return jax.tree.map(reset_if, flags, thresholds)


def layer_densities(params, thresholds):
    """Kept-row fraction of every masked layer, a pytree shaped like `thresholds` of scalars."""
    return jax.tree.map(
        lambda k, t: jnp.mean(hard_row_mask(k, t).astype(jnp.float32)),
        kernels_of(params, thresholds),
        thresholds,
    )
