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
    # The same bits: the store's cohort trains the same program, and the mean and the metrics add
    # the clients in client-id order on either tier.
    for a, b in zip(expected, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.server_thresholds)]),
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(resident.server_thresholds)]),
    )
    # Every client, trained or not, holds what the device tier holds (its weights with the lazy
    # update's pending shifts, its momentum, its thresholds).
    everyone = runner.stored_clients(resident, np.arange(NUM_CLIENTS))
    on_device = jax.device_get(device.unpadded(state).clients)
    for a, b in zip(jax.tree.leaves(on_device), jax.tree.leaves(everyone)):
        np.testing.assert_array_equal(a, b)
    trained = set(np.concatenate(rounds).tolist())
    assert len(trained) < NUM_CLIENTS  # some clients are still their initial models
    # The store holds exactly the clients that trained.
    assert runner.store.bytes_used() >= len(trained) * runner.layout.width * 4
    if tier == 'host':
        assert runner.store.bytes_used() == len(trained) * runner.layout.width * 4
    # Evaluation a chunk at a time is the device tier's evaluation of everyone.
    a, b = device.evaluate(state), runner.evaluate(resident)
    for k in ('correct', 'counts', 'layer_density', 'kept_weights'):
        np.testing.assert_array_equal(np.asarray(a[k]), b[k], err_msg=k)
    panel = np.array([9, 0, 4])
    c = runner.evaluate_clients(resident, panel)
    np.testing.assert_array_equal(c['correct'], np.asarray(a['correct'])[panel])
    runner.close()


def test_disk_journal_takes_the_store_back_to_a_checkpoint(tmp_path):
    one = {'w': np.zeros((2, 3), np.float32), 'on': np.zeros(4, np.bool_)}
    layout = store_lib.Layout(one)
    assert layout.width == 1 + 6 + 4
    store = store_lib.DiskStore(layout, 10, str(tmp_path / 'clients'))

    def rows(value, k):
        return layout.ravel(
            {'w': np.full((k, 2, 3), value, np.float32), 'on': np.ones((k, 4), np.bool_)}
        )

    store.write(np.array([1, 4]), rows(1.0, 2), tag=1)  # round 1
    store.write(np.array([4, 7]), rows(2.0, 2), tag=2)  # round 2
    store.write(np.array([7, 9]), rows(3.0, 2), tag=3)  # round 3, after the checkpoint of 2
    w = lambda r: layout.unravel(r)['w'][:, 0, 0].tolist()  # noqa: E731
    assert w(store.read(np.array([4, 7, 9]))) == [2.0, 3.0, 3.0]
    # A resume from round 2 undoes round 3 only: client 7 back to round 2's value, 9 unwritten.
    assert store.rollback(2) == 1
    back = store.read(np.arange(10))
    assert back[:, 0].tolist() == [0, 1, 0, 0, 1, 0, 0, 1, 0, 0]  # the stored flags
    assert w(back[[1, 4, 7]]) == [1.0, 2.0, 2.0]
    np.testing.assert_array_equal(back[9], 0.0)
    assert store._journal_entries() == []  # emptied
    # A reopened store holds the same; a torn journal entry (no rename) is ignored and removed.
    again = store_lib.DiskStore(layout, 10, str(tmp_path / 'clients'))
    np.testing.assert_array_equal(again.read(np.arange(10)), back)
    torn = tmp_path / 'clients' / 'journal' / '000000000_000000005.npz.tmp'
    torn.write_bytes(b'half')
    assert again.rollback(0) == 0 and not torn.exists()
    # Unravelled rows give the leaves back in their dtypes.
    tree = layout.unravel(back[[4]])
    assert tree['on'].dtype == np.bool_ and tree['on'].all() and tree['w'][0, 1, 2] == 2.0


@pytest.mark.parametrize(
    'changes,field',
    [
        ({'method': 'fedavg'}, 'method'),
        ({'lazy_importance': False}, 'lazy_importance'),
        ({'collapse_check': 'previous', 'eval_panel': 5000}, 'collapse_check'),
        ({'distributed': 'auto'}, 'multi-host'),
        ({'client_store': 'host'}, 'client_store'),
    ],
)
def test_store_configs_that_cannot_work_are_refused(changes, field):
    from spafl_jax import configuration  # pylint: disable=g-import-not-at-top
    from spafl_jax.configs import default  # pylint: disable=g-import-not-at-top

    config = default.get_config()
    config.client_store = 'disk'
    config.update(changes)
    with pytest.raises(configuration.ConfigError, match=field):
        configuration.validate(config)
