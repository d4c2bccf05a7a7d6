"""Threshold aggregation and the aggregated-importance update, on hand-made values."""

import jax
import jax.numpy as jnp
import numpy as np

from spafl_jax import server


def test_uniform_and_data_size_weighted_mean():
    thresholds = {'l': {'threshold': jnp.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])}}
    mean = server.aggregate(thresholds)
    np.testing.assert_allclose(mean['l']['threshold'], [2.0, 4.0])
    weighted = server.aggregate(thresholds, jnp.array([1, 1, 2]))
    np.testing.assert_allclose(weighted['l']['threshold'], [2.5, 5.0])


def test_aggregate_over_a_named_client_axis_is_the_same_mean():
    thresholds = jnp.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0], [6.0, 0.0]])
    weights = jnp.array([1.0, 2.0, 3.0, 4.0])
    # Each member of the named axis holds one client: the psums make it a (weighted) pmean.
    per_member = jax.vmap(
        lambda t, w: server.aggregate(t[None], w[None], axis_name='clients'), axis_name='clients'
    )(thresholds, weights)
    expected = server.aggregate(thresholds, weights)
    for row in np.asarray(per_member):
        np.testing.assert_allclose(row, expected, rtol=1e-6)


def test_importance_update_of_a_dense_kernel_by_hand():
    kernel = jnp.array(
        [[1.0, -1.0, 0.5], [2.0, -3.0, -0.5]]
    )  # row sums 3, -4, 0 -> signs +1, -1, 0
    delta = jnp.array([0.2, 0.4, 0.6])  # D = fan_in = 2
    params = {'d': {'kernel': kernel}}
    updated = server.importance_update(params, {'d': {'threshold': delta}})
    np.testing.assert_allclose(
        updated['d']['kernel'], [[0.9, -0.8, 0.5], [1.9, -2.8, -0.5]], rtol=1e-6
    )


def test_importance_update_of_a_conv_kernel_divides_by_kernel_area():
    kernel = np.zeros((3, 3, 2, 2), np.float32)
    kernel[..., 0] = 1.0
    kernel[..., 1] = -1.0
    params = {'c': {'kernel': jnp.asarray(kernel)}, 'bn': {'scale': jnp.ones(2)}}
    updated = server.importance_update(params, {'c': {'threshold': jnp.array([0.9, 0.9])}})
    # D = 3 * 3 = 9: every weight of row 0 moves by -0.1, of row 1 by +0.1.
    np.testing.assert_allclose(updated['c']['kernel'][..., 0], np.full((3, 3, 2), 0.9), rtol=1e-6)
    np.testing.assert_allclose(updated['c']['kernel'][..., 1], np.full((3, 3, 2), -0.9), rtol=1e-6)
    np.testing.assert_array_equal(updated['bn']['scale'], np.ones(2))
    assert server.importance_normalizer((5, 5, 20, 50)) == 25
    assert server.importance_normalizer((800, 500)) == 800
