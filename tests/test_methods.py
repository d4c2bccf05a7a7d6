"""The uniform method adapter: every method runs through the same calls on real digits, and its
communication per round matches hand-computed counts."""

import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spafl_jax import algorithm as algorithm_lib
from spafl_jax import client as client_lib
from spafl_jax import configuration
from spafl_jax import federated
from spafl_jax import methods
from spafl_jax import metrics as metrics_lib
from spafl_jax import models
from spafl_jax import train
from spafl_jax.client import ClientState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from spafl_jax.configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_CLIENTS = 6
SAMPLED = 3
ROUNDS = 3
# digits_cnn: conv 3x3 1->16, conv 3x3 16->32, dense 512->64, dense 64->10; no bias, no BatchNorm.
NUM_PARAMS = 144 + 4608 + 32768 + 640  # 38160, all of them masked weights
NUM_THRESHOLDS = 16 + 32 + 64 + 10  # 122
NUM_LAYERS = 4
EVAL_BATCH = 64  # test examples per batch of the reference evaluations


def _config(method: str):
    config = default.get_config()
    config.update(
        dict(
            method=method,
            num_clients=NUM_CLIENTS,
            clients_per_round=SAMPLED,
            rounds=ROUNDS,
            local_epochs=1,
        )
    )
    return config


@pytest.fixture(scope='module')
def digits_run():
    """The runner's own data, model and hyperparameters for the tiny digits federation."""
    config = _config('spafl')
    configuration.validate(config)
    return train.Run(config)


@pytest.mark.slow
@pytest.mark.parametrize('name', methods.METHODS)
def test_method_runs_rounds_and_evaluates_as_an_algorithm(name, digits_run):
    run = digits_run
    config = _config(name)
    configuration.validate(config)
    method = methods.get(name, config)
    assert method.name == name and method.communicates_thresholds == (name == 'spafl')

    state = method.init_state(
        run.model,
        run.local_cfg,
        jax.random.key(0),
        num_clients=NUM_CLIENTS,
        image_shape=run.dataset.image_shape,
        num_classes=run.dataset.num_classes,
    )
    params, thresholds, batch_stats = method.client_variables(state)
    one = jax.tree.map(
        lambda x: x[0], {'params': params, 'thresholds': thresholds, 'batch_stats': batch_stats}
    )
    macs = federated.layer_macs(run.model, one, run.dataset.image_shape)
    alg = method.algorithm(run.model, run.local_cfg, run.round_cfg, macs)
    round_fn = algorithm_lib.make_round_fn(
        alg, run.local_cfg, run.spec, aggregation=run.round_cfg.aggregation
    )
    eval_fn = algorithm_lib.make_eval_fn(alg, run.spec, batch_size=EVAL_BATCH)
    before = eval_fn(state, run.test_data)
    for r in range(ROUNDS):
        sampled = jnp.asarray(train.sample_clients(config.seed, r, NUM_CLIENTS, SAMPLED))
        state, metrics = round_fn(state, run.train_data, sampled, run.seed_key)
        assert {'train_loss', 'local_steps', 'max_steps', 'flops'} <= set(metrics), metrics.keys()
        assert np.isfinite(float(metrics['train_loss']))
        assert 0 < float(metrics['local_steps']) <= float(metrics['max_steps'])
        assert float(metrics['flops']) > 0
    assert round_fn._cache_size() == 1  # one compilation serves every round
    result = eval_fn(state, run.test_data)

    n = NUM_CLIENTS
    chex.assert_shape([result['correct'], result['counts'], result['kept_weights']], (n,))
    chex.assert_shape(result['layer_density'], (n, NUM_LAYERS))
    np.testing.assert_array_equal(result['counts'], run.test_data.counts)
    assert np.all(np.asarray(result['correct']) <= np.asarray(result['counts']))
    accuracy = metrics_lib.accuracy_summary(result['correct'], result['counts'])['accuracy']
    accuracy_before = metrics_lib.accuracy_summary(before['correct'], before['counts'])['accuracy']
    print(
        f'{name}: mean client accuracy {accuracy_before:.3f} -> {accuracy:.3f} after {ROUNDS} '
        'rounds'
    )
    assert 0.0 <= accuracy <= 1.0
    assert np.all(
        (np.asarray(result['layer_density']) > 0) & (np.asarray(result['layer_density']) <= 1)
    )
    assert np.all(
        (np.asarray(result['kept_weights']) > 0)
        & (np.asarray(result['kept_weights']) <= NUM_PARAMS)
    )

    # client_variables are exactly the models the method evaluates: SpaFL's evaluator, fed with
    # them, counts the same correct predictions on every client's own test split.
    params, thresholds, batch_stats = method.client_variables(state)
    shapes = jax.tree.map(lambda x: (n, *x.shape), one)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        {'params': params, 'thresholds': thresholds, 'batch_stats': batch_stats},
        jax.tree.map(lambda x, s: jnp.zeros(s, x.dtype), one, shapes),
    )
    clients = ClientState(
        params=params, thresholds=thresholds, batch_stats=batch_stats, opt_state=()
    )
    model = run.model if name == 'spafl' else run.model.clone(estimator='long_tailed')
    again = federated.evaluate(model, run.spec, clients, run.test_data, batch_size=EVAL_BATCH)
    np.testing.assert_array_equal(again['correct'], result['correct'])
    # And they are what the runner may check for finiteness and save.
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((params, batch_stats)))


@pytest.mark.slow
def test_bits_per_round_match_hand_counts(digits_run):
    run = digits_run
    variables = models.init_variables(run.model, jax.random.key(0), run.dataset.image_shape)
    n, s = NUM_CLIENTS, SAMPLED
    bits = {
        name: methods.get(name, _config(name)).bits_per_round(n, s, variables, 'all_after')
        for name in methods.METHODS
    }
    # SpaFL: thresholds up from the sampled clients; down to them, plus the delta to all N clients.
    assert bits['spafl'] == (s * 122 * 32, (s + n) * 122 * 32)
    assert bits['spafl'] == metrics_lib.spafl_bits_per_round(
        NUM_THRESHOLDS, n, s, importance_update='all_after'
    )
    assert methods.get('spafl').bits_per_round(n, s, variables, 'none') == (
        s * 122 * 32,
        s * 122 * 32,
    )
    # FedAvg: every parameter, 32 bits, each way, per sampled client.
    assert bits['fedavg'] == (s * 38160 * 32, s * 38160 * 32)
    # Local: nothing.
    assert bits['local'] == (0, 0)
    # FedPM: 1 bit per masked weight up, a 32-bit probability per masked weight down.
    assert bits['fedpm'] == (s * 38160, s * 38160 * 32)
    # HeteroFL, widths 1, 1/2, 1/4 by client id mod 3 (two clients each): sub-models of 38160, 9736
    # and 2532 entries (tests/test_baselines.py derives them); the expectation of 3 sampled clients.
    expected = 32 * s * (2 * 38160 + 2 * 9736 + 2 * 2532) / n
    assert bits['heterofl'] == (expected, expected) == (32 * 50428, 32 * 50428)
    # FedSpa at density 0.5: 19080 kept weights (32 bits) + a 38160-bit mask up; kept weights down.
    assert bits['fedspa'] == (s * (19080 * 32 + 38160), s * 19080 * 32)
    # The settings come from config.baseline.
    config = _config('fedspa')
    config.baseline.fedspa_density = 0.25
    assert methods.get('fedspa', config).bits_per_round(n, s, variables, 'all_after') == (
        s * (9540 * 32 + 38160),
        s * 9540 * 32,
    )


def test_baseline_settings_reach_the_baselines():
    config = _config('heterofl')
    config.baseline.heterofl_rates = (1.0, 0.5)
    config.baseline.fedpm_score_lr = None
    assert methods.baseline_config('heterofl', config.baseline).rates == (1.0, 0.5)
    assert methods.baseline_config('fedpm', config.baseline).score_lr is None
    assert methods.baseline_config('fedspa', config.baseline).density == 0.5
    assert methods.baseline_config('fedavg', config.baseline) == methods.baselines.make_config(
        'fedavg'
    )
    # Every field of every baseline's settings has its line in the default config, and vice versa.
    assert set(default.get_config().baseline) == set(methods.baseline_fields())


@pytest.mark.parametrize(
    'field, value, message',
    [
        (
            'method',
            'fedprox',
            r"config\.method='fedprox' is not allowed; use one of: spafl, fedavg, "
            r'local, fedpm, heterofl, fedspa',
        ),
        ('baseline.fedspa_density', 1.5, r'config\.baseline\.fedspa_density=1\.5'),
        ('baseline.heterofl_rates', (1.0, 0.0), r'config\.baseline\.heterofl_rates=\(1\.0, 0\.0\)'),
        ('baseline.fedpm_eval_mask', 'mean', r"config\.baseline\.fedpm_eval_mask='mean'"),
        ('baseline.fedpm_prior_reset_every', 0, r'config\.baseline\.fedpm_prior_reset_every=0'),
        ('baseline.fedspa_regrow', 'magnitude', r"config\.baseline\.fedspa_regrow='magnitude'"),
    ],
)
def test_bad_method_settings_name_the_field(field, value, message):
    config = _config('spafl')
    parent, _, key = field.rpartition('.')
    (config[parent] if parent else config)[key] = value
    with pytest.raises(configuration.ConfigError, match=message):
        configuration.validate(config)


def test_unknown_or_missing_method_fields():
    config = _config('spafl')
    config.baseline.fedspa_dens = 0.3  # a typo
    with pytest.raises(
        configuration.ConfigError,
        match=r'config\.baseline\.fedspa_dens is not a '
        'baseline setting',
    ):
        configuration.validate(config)
    config = _config('spafl')
    del config['method']
    with pytest.raises(configuration.ConfigError, match=r'config\.method is missing'):
        configuration.validate(config)
    with pytest.raises(ValueError, match='allowed values: spafl, fedavg'):
        methods.get('fedprox')
    # FedAvg has one global model: without the config it cannot know how many clients to give it.
    state = methods.get('fedavg').init_state(
        'digits_cnn', None, jax.random.key(0), num_clients=NUM_CLIENTS, image_shape=(8, 8, 1)
    )
    with pytest.raises(ValueError, match='config.num_clients'):
        methods.get('fedavg').client_variables(state)


@pytest.mark.parametrize(
    'overrides, message',
    [
        (
            dict(method='fedavg', client_init='independent'),
            r"config\.client_init='independent' applies to spafl and local only",
        ),
        (dict(client_init='each'), r"config\.client_init='each' is not allowed"),
        (dict(method='fedspa', drop_last=False), r'config\.drop_last=False applies to spafl only'),
    ],
)
def test_initialization_and_partial_batch_fields_are_checked(overrides, message):
    config = _config(overrides.pop('method', 'spafl'))
    config.update(overrides)
    with pytest.raises(configuration.ConfigError, match=message):
        configuration.validate(config)


@pytest.mark.parametrize('name', ['spafl', 'local'])
def test_clients_start_from_one_model_unless_asked_otherwise(name):
    for client_init, same in (('shared', True), ('independent', False)):
        config = _config(name)
        config.client_init = client_init
        state = methods.get(name, config).init_state(
            models.create_model('digits_cnn', 10),
            client_lib.LocalConfig(),
            jax.random.key(0),
            num_clients=NUM_CLIENTS,
            image_shape=(8, 8, 1),
        )
        kernel = jax.tree.leaves(state.clients.params)[0]
        assert np.array_equal(kernel[0], kernel[-1]) == same, (name, client_init)
        assert np.abs(np.asarray(kernel[0])).max() > 0
