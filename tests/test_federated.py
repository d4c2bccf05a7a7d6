"""Local training and one SpaFL round: exactly what changes, and what must not."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spafl_jax import algorithm as algorithm_lib
from spafl_jax import client as client_lib
from spafl_jax import data as data_lib
from spafl_jax import federated
from spafl_jax import layers
from spafl_jax import models
from spafl_jax import server

NUM_CLIENTS, SAMPLED, BATCH = 6, 3, 16


@pytest.fixture(scope='module')
def setup():
    dataset = data_lib.load_digits()
    train, test = federated.split_clients(dataset, NUM_CLIENTS, alpha=1.0, min_train_examples=BATCH)
    model = models.create_model('digits_cnn', 10)
    # tests/test_lazy_importance.py's settings: its eager round is the program compiled here.
    cfg = client_lib.LocalConfig(batch_size=BATCH, local_epochs=1, lr=0.05, th_coeff=0.05)
    spec = client_lib.DataSpec(pixel_max=16.0, mean=dataset.mean, std=dataset.std)
    return dataset, train, test, model, cfg, spec


# The programs several tests run, each compiled once for the module.


@pytest.fixture(scope='module')
def local_update(setup):
    _, _, _, model, cfg, spec = setup
    return jax.jit(functools.partial(client_lib.local_update, model, cfg, spec))


@pytest.fixture(scope='module')
def round_fns(setup):
    """`make_round_fn` for each importance update (the state passed in is donated)."""
    _, _, _, model, cfg, spec = setup
    return {
        mode: federated.make_round_fn(
            model, cfg, federated.RoundConfig(SAMPLED, importance_update=mode), spec
        )
        for mode in ('all_after', 'sampled_before')
    }


def _state(model, cfg, image_shape=(8, 8, 1)):
    state = federated.init_state(
        model, cfg, jax.random.key(3), num_clients=NUM_CLIENTS, image_shape=image_shape
    )
    # Non-zero server thresholds and per-client stale thresholds make the checks meaningful.
    server_thresholds = jax.tree.map(lambda t: jnp.full_like(t, 0.01), state.server_thresholds)
    clients = state.clients.replace(
        thresholds=jax.tree.map(
            lambda t: (
                t
                + 0.002 * jnp.arange(NUM_CLIENTS, dtype=t.dtype).reshape(-1, *([1] * (t.ndim - 1)))
            ),
            state.clients.thresholds,
        )
    )
    return state.replace(server_thresholds=server_thresholds, clients=clients)


def _take(tree, k):
    return jax.tree.map(lambda x: np.asarray(x)[k], tree)  # NumPy: no program per leaf shape


def test_penalty_alone_moves_thresholds_by_lr_times_th_coeff():
    # Zero inputs give zero logits whatever the mask: the only gradient on tau is the penalty's,
    # d/dtau th_coeff * exp(-tau) = -th_coeff at tau = 0, so one SGD step gives tau = lr * th_coeff.
    model = layers.MaskedDense(4)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 3)))
    state = client_lib.ClientState(
        params=variables['params'], thresholds=variables['thresholds'], batch_stats={}, opt_state=()
    )
    for warmup, scale in ((False, 1.0), (True, 1 / (1 + np.exp(5.0)))):
        cfg = client_lib.LocalConfig(batch_size=2, lr=0.1, th_coeff=0.5, penalty_warmup=warmup)
        coeff = cfg.th_coeff * client_lib.penalty_scale(cfg, 0)
        opt = client_lib.make_optimizer(cfg).init((state.params, state.thresholds))
        new, _, _ = jax.jit(functools.partial(client_lib.local_step, lambda_model(model), cfg))(
            state,
            opt,
            jnp.zeros((2, 3)),
            jnp.array([0, 1]),
            jnp.array(True),
            lr=client_lib.learning_rate(cfg, 0),
            penalty_coeff=coeff,
        )
        np.testing.assert_allclose(
            new.thresholds['threshold'], np.full(4, 0.1 * 0.5 * scale), rtol=1e-5
        )
        np.testing.assert_array_equal(new.params['kernel'], state.params['kernel'])


class lambda_model:  # noqa: N801  (used like a function)
    """Adapts a bare layer to the model calling convention `apply(variables, x, train=...)`."""

    def __init__(self, layer):
        self.layer = layer

    def apply(self, variables, x, train=False, mutable=()):
        out = self.layer.apply(
            {'params': variables['params'], 'thresholds': variables['thresholds']}, x
        )
        return (out, {}) if mutable else out


def test_learning_rate_decays_to_its_floor():
    cfg = client_lib.LocalConfig(lr=0.01, lr_decay=0.993, min_lr=1e-4)
    np.testing.assert_allclose(client_lib.learning_rate(cfg, 10), 0.01 * 0.993**10, rtol=1e-5)
    np.testing.assert_allclose(client_lib.learning_rate(cfg, 1000), 1e-4, rtol=1e-6)


def test_momentum_follows_pytorch_semantics():
    cfg = client_lib.LocalConfig(momentum=0.9)
    tx = client_lib.make_optimizer(cfg)
    state = tx.init(jnp.zeros(2))
    u1, state = tx.update(jnp.array([1.0, 2.0]), state)
    u2, state = tx.update(jnp.array([0.5, 0.0]), state)
    np.testing.assert_allclose(u1, [1.0, 2.0])
    np.testing.assert_allclose(u2, [0.5 + 0.9, 1.8], rtol=1e-6)  # buf = 0.9 buf + g


def test_global_norm_clip_applies_before_momentum():
    tx = client_lib.make_optimizer(client_lib.LocalConfig(clip=1.0))
    updates, _ = tx.update(
        (jnp.array([3.0]), jnp.array([4.0])), tx.init((jnp.zeros(1), jnp.zeros(1)))
    )
    np.testing.assert_allclose(jnp.concatenate(updates), [0.6, 0.8], rtol=1e-6)


def test_batch_schedule_is_a_shuffle_of_the_clients_own_examples():
    batches, valid = client_lib.batch_schedule(
        jax.random.key(0), count=37, max_count=70, batch_size=8, epochs=2
    )
    assert batches.shape == (2 * 8, 8) and valid.shape == (16,)
    np.testing.assert_array_equal(valid, np.tile(np.arange(8) < 4, 2))  # 37 // 8 = 4 real steps
    for epoch in range(2):
        real = np.asarray(batches[epoch * 8 : epoch * 8 + 4]).ravel()
        assert len(set(real)) == 32 and real.max() < 37  # no repeats, only own examples


def test_padded_step_changes_nothing(setup):
    _, train, _, model, cfg, spec = setup
    state = _take(_state(model, cfg).clients, 0)
    opt = client_lib.make_optimizer(cfg).init((state.params, state.thresholds))
    x = client_lib.preprocess(spec, train.images[:BATCH])
    step = jax.jit(functools.partial(client_lib.local_step, model, cfg))
    new, new_opt, metrics = step(
        state, opt, x, train.labels[:BATCH], jnp.array(False), lr=0.05, penalty_coeff=0.01
    )
    jax.tree.map(np.testing.assert_array_equal, (new, new_opt), (state, opt))
    assert float(metrics['steps']) == 0.0 and float(metrics['loss']) == 0.0


def test_local_update_ignores_padding_and_clients_without_a_full_batch(setup, local_update):
    _, train, _, model, cfg, _ = setup
    state = _take(_state(model, cfg).clients, 1)
    ids, count = train.example_ids[1], train.counts[1]
    run = functools.partial(
        local_update,
        state,
        train.images,
        train.labels,
        rng=jax.random.key(5),
        round_index=0,
    )
    garbage = jnp.where(
        jnp.arange(ids.shape[0]) < count, ids, (ids * 7 + 3) % train.labels.shape[0]
    )
    a, ma = run(ids, count)
    b, mb = run(garbage, count)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert float(ma['steps']) == int(count) // BATCH
    c, mc = run(ids, jnp.int32(BATCH - 1))  # every step is padding
    jax.tree.map(np.testing.assert_array_equal, c, state)
    assert float(mc['steps']) == 0.0


@pytest.mark.parametrize('mode', ['all_after', 'sampled_before'])
def test_one_round_changes_exactly_what_it_should(setup, local_update, round_fns, mode):
    _, train, _, model, cfg, _ = setup

    def initial():
        state = _state(model, cfg)
        return state.replace(
            last_delta=jax.tree.map(lambda t: jnp.full_like(t, 0.003), state.last_delta)
        )

    sampled = jnp.array([0, 2, 5])
    seed_key = jax.random.key(11)
    # `run_round` compiled (`make_round_fn`), which donates the state it is given: a copy of it.
    new, metrics = round_fns[mode](initial(), train, sampled, seed_key)
    state = initial()

    # By hand: broadcast, (importance update before), local training, mean, delta, (update after).
    keys = algorithm_lib.client_keys(seed_key, 0, sampled)
    trained = []
    for i, k in enumerate(np.asarray(sampled)):
        c = _take(state.clients, k).replace(thresholds=state.server_thresholds)
        if mode == 'sampled_before':
            c = c.replace(params=server.importance_update(c.params, state.last_delta))
        c, _ = local_update(
            c,
            train.images,
            train.labels,
            train.example_ids[k],
            train.counts[k],
            rng=keys[i],
            round_index=0,
        )
        trained.append(c)
    mean = jax.tree.map(lambda *t: sum(t) / SAMPLED, *[c.thresholds for c in trained])
    delta = jax.tree.map(jnp.subtract, mean, state.server_thresholds)
    close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6)
    jax.tree.map(close, new.server_thresholds, mean)
    jax.tree.map(close, new.last_delta, delta)
    assert int(new.round) == 1
    for k in range(NUM_CLIENTS):
        old, got = _take(state.clients, k), _take(new.clients, k)
        if k in np.asarray(sampled):
            want = trained[list(np.asarray(sampled)).index(k)]
            jax.tree.map(close, got.thresholds, want.thresholds)  # keeps its own trained thresholds
        else:
            jax.tree.map(np.testing.assert_array_equal, got.thresholds, old.thresholds)  # stale
            jax.tree.map(np.testing.assert_array_equal, got.batch_stats, old.batch_stats)
            want = old
        if mode == 'all_after':  # every client's weights move by the delta rule
            jax.tree.map(close, got.params, server.importance_update(want.params, delta))
        else:
            jax.tree.map(close, got.params, want.params)
    assert float(metrics['local_steps']) == sum(
        int(train.counts[k]) // BATCH for k in np.asarray(sampled)
    )


def test_round_is_compiled_once(setup, round_fns):
    _, train, _, model, cfg, _ = setup
    round_fn = round_fns[federated.RoundConfig(SAMPLED).importance_update]  # the default
    state = _state(model, cfg)
    for r in range(3):
        sampled = jnp.asarray(
            np.sort(np.random.default_rng(r).choice(NUM_CLIENTS, SAMPLED, replace=False))
        )
        state, _ = round_fn(state, train, sampled, jax.random.key(0))
    assert round_fn._cache_size() == 1  # pylint: disable=protected-access
    assert int(state.round) == 3


def test_evaluation_counts_each_clients_own_test_split(setup):
    _, _, test, model, cfg, spec = setup
    state = _state(model, cfg)
    result = federated.make_eval_fn(model, spec, batch_size=7)(state.clients, test)
    assert result['correct'].shape == (NUM_CLIENTS,)
    np.testing.assert_array_equal(result['counts'], test.counts)
    # By hand for client 4: its own model on its own examples.
    c = _take(state.clients, 4)
    ids = np.asarray(test.example_ids[4][: int(test.counts[4])])
    logits = jax.jit(lambda v, x: model.apply(v, client_lib.preprocess(spec, x)))(
        {'params': c.params, 'thresholds': c.thresholds, 'batch_stats': {}},
        np.asarray(test.images)[ids],
    )
    assert int(result['correct'][4]) == int(
        np.sum(np.argmax(logits, -1) == np.asarray(test.labels)[ids])
    )
    np.testing.assert_array_equal(result['layer_density'], np.ones((NUM_CLIENTS, 4)))


def test_partial_last_batch_is_trained_on_with_its_real_examples_only():
    # 37 examples at batch 8: 4 full batches and one of 5, every example once per epoch.
    cfg = client_lib.LocalConfig(batch_size=8, local_epochs=2, drop_last=False)
    assert client_lib.steps_per_epoch(cfg, 37) == 5 and client_lib.steps_per_epoch(cfg, 40) == 5
    batches, valid = client_lib.batch_schedule(
        jax.random.key(0), count=37, max_count=70, batch_size=8, epochs=2, drop_last=False
    )
    stride = client_lib.steps_per_epoch(cfg, 70)  # 9: the largest client's last batch is 6
    assert batches.shape == (2 * stride, 8)
    np.testing.assert_array_equal(valid, np.tile(np.arange(stride) < 5, 2))
    for epoch in range(2):
        steps = np.asarray(batches[epoch * stride : epoch * stride + 5])
        mask = np.asarray(client_lib.example_mask(cfg, steps, 37))
        assert mask[:4].all() and mask[4].sum() == 5
        assert sorted(steps[mask].tolist()) == list(range(37))
    # With drop_last (the default) the draws are the ones the schedule always made.
    kept, _ = client_lib.batch_schedule(jax.random.key(0), 37, 70, batch_size=8, epochs=2)
    assert client_lib.example_mask(client_lib.LocalConfig(), kept, 37) is None


def test_masked_examples_do_not_count_in_the_loss(setup):
    # The loss of a padded batch with its mask is the plain mean over the real examples, as
    # PyTorch's cross-entropy over a short last batch.
    _, train, _, model, cfg, spec = setup
    state = _take(_state(model, cfg).clients, 0)
    x = client_lib.preprocess(spec, train.images[:BATCH])
    y = train.labels[:BATCH]

    # One program per batch shape gives the loss and the thresholds' gradient (with a penalty).
    @jax.jit
    def loss_and_grad(x_, y_, m, coeff):
        loss = lambda t: client_lib.loss_fn(model, state.params, t, {}, x_, y_, coeff, m)
        return jax.value_and_grad(loss, has_aux=True)(state.thresholds)

    (short, (_, _, short_correct)), _ = loss_and_grad(x[:5], y[:5], None, 0.0)
    (padded, (_, _, padded_correct)), _ = loss_and_grad(x, y, jnp.arange(BATCH) < 5, 0.0)
    np.testing.assert_allclose(padded, short, rtol=1e-6)
    assert int(padded_correct) == int(short_correct)
    grads = [
        loss_and_grad(*a)[1]
        for a in ((x[:5], y[:5], None, 0.01), (x, y, jnp.arange(BATCH) < 5, 0.01))
    ]
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), *grads)


def test_reported_density_is_the_evaluated_models(setup):
    # A layer whose thresholds exceed every row is collapsed: the forward pass resets its thresholds
    # to 0, and the density reported is that of the model evaluated (all rows kept), not 0.
    _, _, _, model, cfg, _ = setup
    state = _state(model, cfg)
    names = list(state.clients.thresholds)
    collapsed = dict(state.clients.thresholds)
    collapsed[names[0]] = {'threshold': jnp.full_like(collapsed[names[0]]['threshold'], 10.0)}
    half = jnp.where(jnp.arange(collapsed[names[1]]['threshold'].shape[-1]) % 2 == 0, 10.0, -1.0)
    collapsed[names[1]] = {
        'threshold': jnp.broadcast_to(half, collapsed[names[1]]['threshold'].shape)
    }
    stats = jax.jit(federated.density_stats)(state.clients.replace(thresholds=collapsed))
    np.testing.assert_allclose(stats['layer_density'][:, 0], 1.0)  # reset: every row kept
    np.testing.assert_allclose(stats['layer_density'][:, 1], 0.5)  # half pruned, not collapsed


def _collapsed_layer(collapse_check):
    """A one-layer client whose thresholds (1.0) lie above every row's mean |w| (0.1 .. 0.4)."""
    layer = layers.MaskedDense(4)
    cfg = client_lib.LocalConfig(batch_size=2, lr=0.1, th_coeff=0.0, collapse_check=collapse_check)
    thresholds = {'threshold': jnp.ones(4)}
    state = client_lib.ClientState(
        params={'kernel': jnp.ones((3, 4)) * jnp.array([0.1, 0.2, 0.3, 0.4])},
        thresholds=thresholds,
        batch_stats={},
        opt_state=(),
        collapsed=client_lib.init_collapsed(cfg, thresholds),
    )
    return lambda_model(layer), cfg, state


def test_previous_collapse_check_resets_one_training_step_late():
    x, y = jnp.ones((2, 3)), jnp.array([0, 1])
    steps = {}
    for check in client_lib.COLLAPSE_CHECKS:
        model, cfg, state = _collapsed_layer(check)
        run, opt = [], client_lib.make_optimizer(cfg).init((state.params, state.thresholds))
        step = jax.jit(functools.partial(client_lib.local_step, model, cfg))
        for _ in range(2):
            state, opt, _ = step(state, opt, x, y, jnp.array(True), lr=cfg.lr, penalty_coeff=0.0)
            run.append(state)
        steps[check] = run
    # 'current' resets before the first step; 'previous' trains one step on the collapsed mask
    # (no earlier forward pass found it collapsed), flags the layer, and resets before the second.
    assert np.all(np.abs(steps['current'][0].thresholds['threshold']) < 0.2)
    assert np.all(steps['previous'][0].thresholds['threshold'] > 0.8)
    assert bool(steps['previous'][0].collapsed['threshold'])
    assert np.all(np.abs(steps['previous'][1].thresholds['threshold']) < 0.2)
    assert not bool(steps['previous'][1].collapsed['threshold'])
    assert steps['current'][1].collapsed == ()


def test_previous_collapse_check_test_resets_after_its_first_batch():
    _, cfg, client = _collapsed_layer('previous')
    zeros, high = np.zeros(4), np.ones(4)
    # One test batch (2 examples, batch size 2): it uses the collapsed mask and only flags it.
    first, rest, tested = federated.test_thresholds(cfg, client, 2)
    np.testing.assert_array_equal(first['threshold'], high)
    np.testing.assert_array_equal(rest['threshold'], zeros)
    np.testing.assert_array_equal(tested.thresholds['threshold'], high)
    assert bool(tested.collapsed['threshold'])
    # Its next forward pass resets; so does a second batch of the same test, and the reset stays.
    again = federated.test_thresholds(cfg, tested, 2)
    np.testing.assert_array_equal(again[0]['threshold'], zeros)
    _, _, tested = federated.test_thresholds(cfg, client, 3)
    np.testing.assert_array_equal(tested.thresholds['threshold'], zeros)
    assert not bool(tested.collapsed['threshold'])
    # No test examples: no forward pass, nothing changes.
    _, _, untouched = federated.test_thresholds(cfg, client, 0)
    assert jax.tree.all(jax.tree.map(np.array_equal, untouched, client))
    # 'current' resets the mask it is about to use and leaves the client as it is.
    _, cfg, client = _collapsed_layer('current')
    first, _, tested = federated.test_thresholds(cfg, client, 2)
    np.testing.assert_array_equal(first['threshold'], zeros)
    assert tested is client


def test_max_steps_counts_the_steps_each_engine_executes():
    """Under 'vmap' every client's loop runs as long as the longest one's; under 'map' each runs
    its own: the useful-step fraction means the same for every method and engine."""
    metrics = {
        'steps': jnp.array([3.0, 5.0, 2.0]),
        'loss': jnp.array([3.0, 10.0, 1.0]),
        'correct': jnp.array([10.0, 20.0, 5.0]),
        'examples': jnp.array([30.0, 50.0, 20.0]),
        'flops': jnp.array([1.0, 2.0, 3.0]),
        'real': jnp.ones(3),
    }
    executed = lambda e: algorithm_lib.executed_steps(metrics['steps'], e)
    vmapped = algorithm_lib.round_metrics(metrics, executed('vmap'))
    mapped = algorithm_lib.round_metrics(metrics, executed('map'))
    assert float(vmapped['max_steps']) == 15.0 and float(mapped['max_steps']) == 10.0
    for m in (vmapped, mapped):
        assert float(m['local_steps']) == 10.0 and float(m['flops']) == 6.0
        np.testing.assert_allclose(float(m['train_loss']), (1.0 + 2.0 + 0.5) / 3)
        np.testing.assert_allclose(float(m['train_accuracy']), 35.0 / 100.0)
