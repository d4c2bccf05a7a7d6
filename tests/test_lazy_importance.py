"""The lazy importance update: two numbers per client and row stand for every weight, exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spafl_jax import client as client_lib
from spafl_jax import data as data_lib
from spafl_jax import federated
from spafl_jax import methods
from spafl_jax import models
from spafl_jax import server
from spafl_jax.configs import default as default_config


def _one_layer(kernel):
    return {'fc': {'kernel': jnp.asarray(kernel, jnp.float32)}}


def _thresholds(kernel):
    return {'fc': {'threshold': jnp.zeros(np.shape(kernel)[-1], jnp.float32)}}


def test_one_lazy_step_by_hand():
    # A dense kernel [fan_in 2, rows 3]: D = 2, n = 2. Row sums 3, -1, 0; delta 0.4, 0.2, 0.6.
    kernel = np.array([[1.0, -2.0, 0.5], [2.0, 1.0, -0.5]], np.float32)
    params, thresholds = _one_layer(kernel), _thresholds(kernel)
    sums = server.row_sums(params, thresholds)
    np.testing.assert_allclose(sums['fc']['threshold'], [3.0, -1.0, 0.0])
    delta = {'fc': {'threshold': jnp.array([0.4, 0.2, 0.6])}}
    shifts = jax.tree.map(jnp.zeros_like, sums)
    kernels = {'fc': {'threshold': params['fc']['kernel']}}
    sums, shifts = server.lazy_importance_update(sums, shifts, delta, kernels)
    # step = sign(s) delta / D = 0.2, -0.1, 0 (a zero sum does not move); s -= n step.
    np.testing.assert_allclose(shifts['fc']['threshold'], [0.2, -0.1, 0.0], rtol=1e-6)
    np.testing.assert_allclose(sums['fc']['threshold'], [2.6, -0.8, 0.0], rtol=1e-6)
    # The weights it stands for are the eager update's.
    np.testing.assert_allclose(
        server.apply_shifts(params, shifts)['fc']['kernel'],
        server.importance_update(params, delta)['fc']['kernel'],
        rtol=1e-6,
    )


def test_lazy_equals_eager_over_hundreds_of_rounds_with_sign_changes():
    # A conv kernel (D = 9, n = 36) and a dense one (D = n = 20); thresholds that mostly rise,
    # so rows shrink towards zero, cross it and turn back, and sometimes fall.
    rng = np.random.default_rng(0)
    params = {
        'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 4, 8)) * 0.2, jnp.float32)},
        'fc': {'kernel': jnp.asarray(rng.normal(size=(20, 6)) * 0.2, jnp.float32)},
    }
    thresholds = {
        'conv': {'threshold': jnp.zeros(8, jnp.float32)},
        'fc': {'threshold': jnp.zeros(6, jnp.float32)},
    }
    rounds = 300
    deltas = [
        jax.tree.map(
            lambda t: jnp.asarray(rng.uniform(-0.002, 0.006, t.shape), jnp.float32), thresholds
        )
        for _ in range(rounds)
    ]
    kernels = {k: {'threshold': params[k]['kernel']} for k in params}
    eager = jax.jit(server.importance_update)
    lazy = jax.jit(server.lazy_importance_update)

    w = params
    sums = server.row_sums(params, thresholds)
    shifts = jax.tree.map(jnp.zeros_like, sums)
    first_signs = jnp.concatenate([jnp.sign(s) for s in jax.tree.leaves(sums)])
    sign_changes, smallest = 0, np.inf
    for delta in deltas:
        eager_sums = server.row_sums(w, thresholds)
        # The recurrence's sums are the eager weights' sums, and so are their signs.
        for a, b in zip(jax.tree.leaves(sums), jax.tree.leaves(eager_sums)):
            np.testing.assert_allclose(a, b, atol=2e-5)
            np.testing.assert_array_equal(np.sign(a), np.sign(b))
        smallest = min(smallest, min(float(jnp.min(jnp.abs(s))) for s in jax.tree.leaves(sums)))
        signs = jnp.concatenate([jnp.sign(s) for s in jax.tree.leaves(sums)])
        sign_changes = max(sign_changes, int(jnp.sum(signs != first_signs)))
        w = eager(w, delta)
        sums, shifts = lazy(sums, shifts, delta, kernels)

    assert sign_changes >= 5, sign_changes  # the signs flipped, and the flips were followed
    # No sum came within float32 rounding (~1e-7 here) of zero, where the eager sign is noise too.
    assert smallest > 1e-6, smallest
    materialized = server.apply_shifts(params, shifts)
    for a, b in zip(jax.tree.leaves(materialized), jax.tree.leaves(w)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The weights really moved: far more than the tolerance.
    moved = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(params))
    )
    assert moved > 0.05, moved


NUM_CLIENTS, SAMPLED, BATCH = 6, 3, 16


@pytest.fixture(scope='module')
def setup():
    # tests/test_federated.py's clients and settings: the eager round is the program it compiles
    # (`make_round_fn`), which the persistent compilation cache then serves here.
    dataset = data_lib.load_digits()
    train, test = federated.split_clients(dataset, NUM_CLIENTS, alpha=1.0, min_train_examples=BATCH)
    model = models.create_model('digits_cnn', 10)
    cfg = client_lib.LocalConfig(batch_size=BATCH, local_epochs=1, lr=0.05, th_coeff=0.05)
    spec = client_lib.DataSpec(pixel_max=16.0, mean=dataset.mean, std=dataset.std)
    return train, test, model, cfg, spec


def test_lazy_rounds_compute_the_eager_rounds(setup):
    train, test, model, cfg, spec = setup
    round_cfg = federated.RoundConfig(clients_per_round=SAMPLED, importance_update='all_after')
    states = {
        lazy: federated.init_state(
            model,
            cfg,
            jax.random.key(3),
            num_clients=NUM_CLIENTS,
            image_shape=(8, 8, 1),
            lazy_importance=lazy,
        )
        for lazy in (False, True)
    }
    assert not federated.is_lazy(states[False].clients) and federated.is_lazy(states[True].clients)
    # The lazy state holds two [clients, rows] numbers per masked layer more, nothing per weight.
    rows = sum(t.size for t in jax.tree.leaves(states[False].clients.thresholds))
    extra = sum(x.size for x in jax.tree.leaves(states[True].clients)) - sum(
        x.size for x in jax.tree.leaves(states[False].clients)
    )
    assert extra == 2 * rows
    step = federated.make_round_fn(model, cfg, round_cfg, spec)  # donates the state it is given
    evaluate = federated.make_eval_fn(model, spec, batch_size=64, cfg=cfg)
    rng = np.random.default_rng(1)
    for r in range(8):
        sampled = jnp.asarray(rng.choice(NUM_CLIENTS, SAMPLED, replace=False))
        key = jax.random.key(100 + r)
        states = {lazy: step(s, train, sampled, key)[0] for lazy, s in states.items()}
    eager, lazy = states[False], states[True]
    # Never-trained clients have pending shifts; the materialized weights are the eager ones.
    assert any(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree.leaves(lazy.clients.shifts))
    materialized = jax.vmap(federated.materialize)(lazy.clients)
    for a, b in zip(jax.tree.leaves(materialized.params), jax.tree.leaves(eager.clients.params)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    for a, b in zip(
        jax.tree.leaves(lazy.server_thresholds), jax.tree.leaves(eager.server_thresholds)
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Evaluation reads the weights through the shifts: the same accuracy and densities.
    a, b = evaluate(eager.clients, test), evaluate(lazy.clients, test)
    np.testing.assert_array_equal(a['correct'], b['correct'])
    np.testing.assert_array_equal(a['layer_density'], b['layer_density'])
    # And so does what the runner exports and reports (`Method.client_variables`).
    params, _, _ = methods.get('spafl').client_variables(lazy)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(eager.clients.params)):
        np.testing.assert_allclose(x, y, atol=2e-5)


def test_lazy_is_the_default_for_all_after_only():
    config = default_config.get_config()
    assert config.lazy_importance and config.importance_update == 'all_after'
    model = models.create_model('digits_cnn', 10)
    cfg = client_lib.LocalConfig()

    def initial_clients():  # their structure, which says whether they are lazy: nothing compiled
        init = methods.get('spafl', config).init_state
        return jax.eval_shape(
            lambda: init(model, cfg, jax.random.key(0), num_clients=2, image_shape=(8, 8, 1))
        ).clients

    assert federated.is_lazy(initial_clients())
    for update, flag in (('sampled_before', True), ('all_after', False)):
        config.importance_update, config.lazy_importance = update, flag
        assert not federated.is_lazy(initial_clients())
