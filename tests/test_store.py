"""Client stores off the devices (spafl_jax/store.py): the same rounds as the device tier."""

import jax
import numpy as np
import pytest

from spafl_jax import client as client_lib
from spafl_jax import data as data_lib
from spafl_jax import execution
from spafl_jax import federated
from spafl_jax import models
from spafl_jax import store as store_lib

NUM_CLIENTS, SAMPLED, BATCH, ROUNDS = 12, 4, 16, 6


@pytest.fixture(scope='module')
def setup():
    dataset = data_lib.load_digits()
    train, test = federated.split_clients(dataset, NUM_CLIENTS, alpha=1.0, min_train_examples=BATCH)
    model = models.create_model('digits_cnn', 10)
    cfg = client_lib.LocalConfig(
        batch_size=BATCH, local_epochs=1, lr=0.05, th_coeff=0.05, persistent_optimizer=True
    )
    spec = client_lib.DataSpec(pixel_max=16.0, mean=dataset.mean, std=dataset.std)
    return train, test, model, cfg, spec


def _schedule():
    """Rounds' samples where clients come back in the very next round (the prefetched read is
    then older than their last training) and some never train."""
    rng = np.random.default_rng(5)
    rounds = [np.sort(rng.choice(NUM_CLIENTS - 2, SAMPLED, replace=False)) for _ in range(ROUNDS)]
    rounds[1] = np.array(sorted(set(rounds[0][:2]) | {8, 9}))[:SAMPLED]
    return rounds


def _device_tier(setup, update, client_init, rounds):
    train, test, model, cfg, spec = setup
    round_cfg = federated.RoundConfig(clients_per_round=SAMPLED, importance_update=update)
    runner = execution.RoundRunner(model, cfg, round_cfg, spec, train, test, strategy='map')
    state = federated.init_state(
        model,
        cfg,
        jax.random.key(7),
        num_clients=NUM_CLIENTS,
        image_shape=(8, 8, 1),
        client_init=client_init,
        lazy_importance=update == 'all_after',
    )
    metrics = []
    for r, sampled in enumerate(rounds):
        state, m = runner.run_round(state, sampled, jax.random.key(100 + r))
        metrics.append(jax.device_get(m))
    return runner, state, metrics


def _store_tier(setup, update, client_init, rounds, tier, directory):
    train, test, model, cfg, spec = setup
    round_cfg = federated.RoundConfig(clients_per_round=SAMPLED, importance_update=update)
    runner, resident = store_lib.make_store_runner(
        model,
        cfg,
        round_cfg,
        spec,
        train,
        test,
        tier=tier,
        rng=jax.random.key(7),
        image_shape=(8, 8, 1),
        client_init=client_init,
        directory=directory,
        eval_clients=5,  # chunks of 5: a sweep of 12 is three reads, the last one padded
        strategy='map',
    )
    metrics = []
    for r, sampled in enumerate(rounds):
        following = rounds[r + 1] if r + 1 < len(rounds) else None
        resident, m = runner.run_round(resident, sampled, jax.random.key(100 + r), following)
        metrics.append(jax.device_get(m))
    return runner, resident, metrics


@pytest.mark.parametrize(
    'tier,update,client_init',
    [
        ('host', 'all_after', 'shared'),
        ('disk', 'all_after', 'independent'),
        ('host', 'sampled_before', 'independent'),
    ],
)
def test_store_rounds_compute_the_device_rounds(setup, tmp_path, tier, update, client_init):
    rounds = _schedule()
    assert set(rounds[0]) & set(rounds[1])  # a client trains in two consecutive rounds
    device, state, expected = _device_tier(setup, update, client_init, rounds)
    runner, resident, got = _store_tier(
        setup, update, client_init, rounds, tier, str(tmp_path / 'clients')
    )
    for a, b in zip(expected, got):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.server_thresholds)]),
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(resident.server_thresholds)]),
        atol=1e-7,
    )
    # Every client, trained or not, holds what the device tier holds (its weights with the lazy
    # update's pending shifts, its momentum, its thresholds).
    everyone = runner.stored_clients(resident, np.arange(NUM_CLIENTS))
    on_device = jax.device_get(device.unpadded(state).clients)
    for a, b in zip(jax.tree.leaves(on_device), jax.tree.leaves(everyone)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    trained = set(np.concatenate(rounds).tolist())
    assert len(trained) < NUM_CLIENTS  # some clients are still their initial models
    # The store holds exactly the clients that trained.
    assert runner.store.bytes_used() >= len(trained) * runner.layout.width * 4
    if tier == 'host':
        assert runner.store.bytes_used() == len(trained) * runner.layout.width * 4
    # Evaluation a chunk at a time is the device tier's evaluation of everyone.
    a, b = device.evaluate(state), runner.evaluate(resident)
    for k in ('correct', 'counts', 'layer_density', 'kept_weights'):
        np.testing.assert_allclose(np.asarray(a[k]), b[k], atol=1e-6, err_msg=k)
    panel = np.array([9, 0, 4])
    c = runner.evaluate_clients(resident, panel)
    np.testing.assert_array_equal(c['correct'], np.asarray(a['correct'])[panel])
    runner.close()
