"""The mask rule, the three step estimators and the density-collapse reset, on hand-made values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spafl_jax import layers
from spafl_jax import masking


def test_row_mask_of_a_dense_kernel_by_hand():
    # Rows are output columns (Flax layout [in, out]): mean |w| = 2.0, 0.5, 1.0 (exact in binary).
    kernel = jnp.array([[1.0, 0.25, -1.0], [-2.0, 0.5, 1.0], [3.0, -0.75, 1.0]])
    threshold = jnp.array([1.5, 0.5, 1.0])  # 0.5 > 0.5 and 1.0 > 1.0 are false: strict >
    np.testing.assert_array_equal(masking.row_mask(kernel, threshold), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(
        masking.masked_kernel(kernel, threshold),
        [[1.0, 0.0, 0.0], [-2.0, 0.0, 0.0], [3.0, 0.0, 0.0]],
    )
    np.testing.assert_array_equal(masking.row_mask(kernel, threshold - 1e-3), [1.0, 1.0, 1.0])


def test_row_mask_of_a_conv_kernel_averages_over_space_and_inputs():
    kernel = np.zeros((2, 2, 2, 2), np.float32)
    kernel[..., 0] = 0.5  # mean |w| 0.5
    kernel[..., 1] = [
        [[1.0, -1.0], [0.0, 0.0]],  # mean |w| 2/8 = 0.25
        [[0.0, 0.0], [0.0, 0.0]],
    ]
    np.testing.assert_allclose(masking.row_magnitude(jnp.asarray(kernel)), [0.5, 0.25])
    np.testing.assert_array_equal(
        masking.row_mask(jnp.asarray(kernel), jnp.array([0.3, 0.3])), [1.0, 0.0]
    )


EXPECTED = {
    #                x: -1.5 -0.7 -0.3  0.0  0.2  0.4  0.5  1.0  1.2
    'long_tailed': [0.0, 0.4, 0.8, 2.0, 1.2, 0.4, 0.4, 0.4, 0.0],
    'identity': [1.0] * 9,
    'outside_unit': [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
}


@pytest.mark.parametrize('estimator', sorted(EXPECTED))
def test_estimator_gradient_matches_its_formula(estimator):
    x = jnp.array([-1.5, -0.7, -0.3, 0.0, 0.2, 0.4, 0.5, 1.0, 1.2])
    upstream = jnp.arange(1.0, 10.0)
    forward = masking.step(x, estimator)
    np.testing.assert_array_equal(forward, (np.asarray(x) > 0).astype(np.float32))
    grad = jax.grad(lambda v: jnp.sum(masking.step(v, estimator) * upstream))(x)
    np.testing.assert_allclose(
        grad, np.array(EXPECTED[estimator]) * np.arange(1.0, 10.0), rtol=1e-6
    )


def test_threshold_gradient_through_a_masked_dense_layer():
    # y = x @ (W * m); L = sum(y). dL/dm_i = sum_b sum_j x_bj W_ji; dL/dtau_i = -est(a_i - tau_i) dL/dm_i.
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=(4, 3)).astype(np.float32) * 0.5)
    x = jnp.asarray(rng.normal(size=(5, 4)).astype(np.float32))
    tau = jnp.array([0.1, 0.35, 0.2])
    model = layers.MaskedDense(3)
    grad = jax.grad(
        lambda t: jnp.sum(
            model.apply({'params': {'kernel': kernel}, 'thresholds': {'threshold': t}}, x)
        )
    )(tau)
    a = np.mean(np.abs(np.asarray(kernel)), axis=0)
    dm = np.einsum('bj,ji->i', np.asarray(x), np.asarray(kernel))
    est = np.asarray(masking.ESTIMATORS['long_tailed'](jnp.asarray(a - np.asarray(tau))))
    np.testing.assert_allclose(grad, -est * dm, rtol=1e-5)


def test_masked_dense_layer_starts_with_zero_thresholds_and_torch_init():
    variables = layers.MaskedDense(50).init(jax.random.key(0), jnp.ones((1, 400)))
    np.testing.assert_array_equal(variables['thresholds']['threshold'], np.zeros(50))
    kernel = np.asarray(variables['params']['kernel'])
    assert kernel.shape == (400, 50) and 'bias' not in variables['params']
    assert np.abs(kernel).max() <= 1 / np.sqrt(400)  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert np.abs(kernel).max() > 0.9 / np.sqrt(400)


def test_density_collapse_reset_at_one_percent():
    kernel = jnp.ones((3, 100)) * jnp.arange(1, 101) / 100.0  # row i has mean |w| (i+1)/100
    keep_one = jnp.full((100,), 0.995)  # only row 99 (1.0) survives: 1 %
    np.testing.assert_array_equal(masking.reset_collapsed(kernel, keep_one), np.zeros(100))
    keep_two = jnp.full((100,), 0.985)  # rows 98, 99 survive: 2 %
    np.testing.assert_array_equal(masking.reset_collapsed(kernel, keep_two), keep_two)


def test_thresholds_pair_with_their_kernels():
    params = {
        'a': {'kernel': jnp.ones((2, 3))},
        'bn': {'scale': jnp.ones(3)},
        'b': {'kernel': jnp.ones((3, 3, 2, 4))},
    }
    thresholds = {'a': {'threshold': jnp.zeros(3)}, 'b': {'threshold': jnp.zeros(4)}}
    kernels = masking.kernels_of(params, thresholds)
    assert kernels['a']['threshold'].shape == (2, 3)
    assert kernels['b']['threshold'].shape == (3, 3, 2, 4)
    replaced = masking.replace_kernels(params, jax.tree.map(jnp.zeros_like, kernels))
    assert float(jnp.sum(replaced['b']['kernel'])) == 0.0
    assert float(jnp.sum(replaced['bn']['scale'])) == 3.0
    assert masking.layer_names(thresholds) == ['a', 'b']
