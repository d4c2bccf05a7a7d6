"""Communication, accuracy, density and FLOP accounting against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

from spafl_jax import client as client_lib
from spafl_jax import metrics


def test_bits_of_a_lenet_round_by_hand():
    # 580 thresholds of 32 bits; 10 of 100 clients sampled.
    up, down = metrics.spafl_bits_per_round(580, 100, 10, importance_update='all_after')
    assert up == 10 * 580 * 32 == 185_600
    assert down == 10 * 580 * 32 + 100 * 580 * 32 == 2_041_600  # broadcast + delta to everyone
    assert metrics.spafl_bits_per_round(580, 100, 10, importance_update='sampled_before') == (
        185_600,
        371_200,
    )
    assert metrics.spafl_bits_per_round(580, 100, 10, importance_update='none') == (
        185_600,
        185_600,
    )
    assert metrics.dense_bits_per_round(430_500, 10) == 10 * 430_500 * 32


def test_accuracy_is_the_unweighted_client_mean_and_the_weighted_one():
    result = metrics.accuracy_summary(np.array([9, 1, 0]), np.array([10, 2, 0]))  # 3rd: no test
    assert result['accuracy'] == pytest.approx((0.9 + 0.5) / 2)
    assert result['accuracy_weighted'] == pytest.approx(10 / 12)


def test_density_official_layer_mean_and_parameter_weighted():
    layer_density = np.array([[1.0, 0.5], [0.5, 0.5]])
    kept = np.array([60, 40])
    result = metrics.density_summary(
        layer_density, kept, masked_weights=100, layer_names=['conv', 'dense']
    )
    assert result['density'] == pytest.approx(0.625)
    assert result['density_weighted'] == pytest.approx(0.5)
    assert result['density/conv'] == pytest.approx(0.75)
    assert result['density/dense'] == pytest.approx(0.5)


def test_training_flops_count_kept_rows_three_times():
    params = {
        'a': {'kernel': jnp.array([[1.0, 1.0, 0.0, 0.0]])},  # 2 of 4 rows kept
        'b': {'kernel': jnp.ones((4, 2))},
    }  # all kept
    thresholds = {'a': {'threshold': jnp.full(4, 0.5)}, 'b': {'threshold': jnp.zeros(2)}}
    macs = {'a': {'threshold': 100.0}, 'b': {'threshold': 10.0}}
    flops = client_lib.training_flops(params, thresholds, macs, batch_size=8)
    assert float(flops) == pytest.approx(3 * 8 * (100 * 0.5 + 10 * 1.0))
