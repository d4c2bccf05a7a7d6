"""Execution strategies: every one computes `federated.run_round` exactly, the host-side plan runs
each real step once and balances the work, and 'auto' resolves per backend."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spafl_jax.configs import default
from spafl_jax import client as client_lib
from spafl_jax import configuration
from spafl_jax import data as data_lib
from spafl_jax import execution
from spafl_jax import federated
from spafl_jax import models

NUM_CLIENTS, SAMPLED, BATCH, ROUNDS = 6, 3, 16, 2


# --------------------------------------------------------------------------------------------------
# The plan (host arithmetic only).


def _steps_in_plan(plan: execution.RoundPlan) -> dict[int, list[int]]:
    """{client id: the schedule steps it runs, in order} read back from a plan."""
    devices, slots, lanes = plan.positions.shape
    per_device = len(plan.sampled) // devices
    runs: dict[int, list[int]] = {}
    for d in range(devices):
        for lane in range(lanes):
            for t in range(slots):
                if plan.valid[d, t, lane]:
                    client = plan.sampled[d * per_device + plan.positions[d, t, lane]]
                    runs.setdefault(int(client), []).append(int(plan.steps[d, t, lane]))
    return runs


@pytest.mark.parametrize('devices,lanes', [(1, 1), (2, 1), (4, 1), (1, 2), (2, 5)])
def test_plan_runs_every_real_step_once_in_schedule_order(devices, lanes):
    counts = np.array([37, 300, 64, 129, 90, 200, 16, 75])  # examples per client
    steps_per_epoch, epochs, stride = counts // 16, 3, 300 // 16
    sampled = np.array([0, 1, 3, 4, 6])
    plan = execution.plan_round(
        sampled,
        steps_per_epoch,
        epochs=epochs,
        stride=stride,
        devices=devices,
        lanes=lanes,
        max_slots=500,
    )
    runs = _steps_in_plan(plan)
    assert sorted(runs) == sorted(sampled.tolist())
    for c in sampled:
        n = steps_per_epoch[c]
        # Epoch e's s-th batch sits at e * stride + s of `client.local_schedule`.
        assert runs[c] == [e * stride + s for e in range(epochs) for s in range(n)]
    assert plan.real_steps == epochs * steps_per_epoch[sampled].sum()
    # Positions not holding a client are marked empty (-1); each client appears once.
    real = plan.sampled[plan.sampled >= 0]
    assert sorted(real.tolist()) == sorted(sampled.tolist())


def test_plan_packing_keeps_the_useful_step_fraction_high_on_a_skewed_split():
    # The official CIFAR-10 setting: Dirichlet alpha = 0.1 over 100 clients, batch 16.
    labels = np.repeat(np.arange(10), 5000)
    train_ids, _ = data_lib.dirichlet_split(
        labels, labels[:1000], 100, alpha=0.1, min_train_examples=16, seed=1
    )
    steps_per_epoch = np.array([len(ids) for ids in train_ids]) // 16
    stride = steps_per_epoch.max()
    useful = {}
    for name, devices, lanes in (
        ('one lane', 1, 1),
        ('two devices', 2, 1),
        ('10 lanes', 1, 10),
        ('2 lanes', 1, 2),
    ):
        executed = real = 0
        for r in range(20):
            sampled = np.random.default_rng([1, r]).choice(100, 10, replace=False)
            plan = execution.plan_round(
                sampled,
                steps_per_epoch,
                epochs=5,
                stride=stride,
                devices=devices,
                lanes=lanes,
                max_slots=execution.max_lane_steps(steps_per_epoch, 5, 10),
            )
            executed += plan.executed_steps()
            real += plan.real_steps
        useful[name] = real / executed
    assert useful['one lane'] == 1.0  # 'map' on one device: no padding
    assert useful['two devices'] > 0.9  # packed onto two devices by step count
    assert useful['2 lanes'] > 0.9
    assert useful['10 lanes'] < 0.5  # one client per lane: padded to the longest


def test_auto_resolves_per_backend():
    assert execution.resolve_client_execution('auto', 'cpu') == 'map'
    assert execution.resolve_client_execution('auto', 'gpu') == 'vmap'
    assert execution.resolve_client_execution('auto', 'tpu') == 'vmap'
    assert execution.resolve_client_execution('map', 'tpu') == 'map'
    for gone in ('pmap', 'loop'):  # 'loop' was measured and removed (BENCHMARKS.md)
        with pytest.raises(ValueError, match='client_execution'):
            execution.resolve_client_execution(gone)


def test_config_validation_names_the_execution_field():
    for field, value in (
        ('client_execution', 'pmap'),
        ('vmap_lanes', -1),
        ('eval_chunk', 0),
        ('num_processes', 0),
        ('coordinator_address', 'localhost'),
        ('num_cpu_devices', -2),
    ):
        config = default.get_config()
        config[field] = value
        with pytest.raises(configuration.ConfigError, match=f'config.{field}'):
            configuration.validate(config)
    config = default.get_config()
    config.update(num_processes=2, process_id=2)
    with pytest.raises(configuration.ConfigError, match='config.process_id'):
        configuration.validate(config)
    config.update(process_id=1)
    with pytest.raises(configuration.ConfigError, match='config.coordinator_address'):
        configuration.validate(config)


def test_auto_cpu_devices_is_one_per_core_and_at_most_one_per_client(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2}, raising=False)
    assert execution.auto_cpu_devices(10) == 3
    assert execution.auto_cpu_devices(2) == 2
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0}, raising=False)
    assert execution.auto_cpu_devices(10) == 1


@pytest.mark.slow
def test_auto_cpu_devices_split_a_fresh_process_and_leave_a_started_one_alone():
    devices = jax.device_count()  # JAX has started in this process
    execution.initialize_runtime(num_cpu_devices=execution.AUTO_CPU_DEVICES, clients_per_round=10)
    assert jax.device_count() == devices
    script = (
        'import os, jax\n'
        'os.sched_getaffinity = lambda pid: {0, 1, 2}\n'
        'from spafl_jax import execution\n'
        'execution.initialize_runtime(num_cpu_devices=-1, clients_per_round=10)\n'
        'print(jax.device_count())\n'
    )
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    out = subprocess.run(
        [sys.executable, '-c', script],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.stdout.split()[-1] == '3'


# --------------------------------------------------------------------------------------------------
# Rounds: every strategy is `federated.run_round`.


@pytest.fixture(scope='module')
def digits():
    dataset = data_lib.load_digits()
    train, test = federated.split_clients(dataset, NUM_CLIENTS, alpha=0.3, min_train_examples=BATCH)
    spec = client_lib.DataSpec(pixel_max=16.0, mean=dataset.mean, std=dataset.std)
    return train, test, spec


def _rounds(round_fn, state, train):
    for r in range(ROUNDS):
        sampled = np.sort(np.random.default_rng([2, r]).choice(NUM_CLIENTS, SAMPLED, replace=False))
        state, metrics = round_fn(state, train, sampled)
    return state, metrics


@pytest.mark.slow
def test_every_strategy_is_the_spafl_round(digits):
    # The official FMNIST variant (importance update of the sampled clients before training,
    # persistent momentum) with a CNN: the parts of the round most easily got wrong.
    train, test, spec = digits
    model = models.create_model('digits_cnn', 10)
    cfg = client_lib.LocalConfig(
        batch_size=BATCH, local_epochs=2, lr=0.05, th_coeff=0.01, persistent_optimizer=True
    )
    round_cfg = federated.RoundConfig(clients_per_round=SAMPLED, importance_update='sampled_before')
    initial = federated.init_state(
        model, cfg, jax.random.key(3), num_clients=NUM_CLIENTS, image_shape=(8, 8, 1)
    )
    # Non-zero thresholds and delta, so the broadcast and the importance update matter.
    initial = initial.replace(
        server_thresholds=jax.tree.map(lambda t: jnp.full_like(t, 0.01), initial.server_thresholds),
        last_delta=jax.tree.map(lambda t: jnp.full_like(t, 0.003), initial.last_delta),
    )
    fresh = lambda: jax.tree.map(jnp.copy, initial)
    seed_key = jax.random.key(7)

    reference_fn = federated.make_round_fn(model, cfg, round_cfg, spec)
    ref_state, ref_metrics = _rounds(
        lambda s, d, sampled: reference_fn(s, d, jnp.asarray(sampled), seed_key), fresh(), train
    )
    ref_eval = federated.make_eval_fn(model, spec, batch_size=64)(ref_state.clients, test)

    for strategy, lanes in (('map', 1), ('vmap', 2)):
        runner = execution.RoundRunner(
            model, cfg, round_cfg, spec, train, test, strategy=strategy, lanes=lanes, eval_chunk=16
        )
        state, metrics = _rounds(
            lambda s, d, sampled: runner.run_round(s, sampled, seed_key), fresh(), train
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=strategy),
            jax.device_get(state),
            jax.device_get(ref_state),
        )
        for key in ('train_loss', 'train_accuracy', 'local_steps'):
            np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
        # Only real steps run ('map'), fewer padded ones than the padded scan ('vmap').
        assert float(metrics['max_steps']) <= float(ref_metrics['max_steps'])
        if strategy != 'vmap':
            assert float(metrics['max_steps']) == float(metrics['local_steps'])
        evaluation = runner.evaluate(state)
        np.testing.assert_array_equal(evaluation['correct'], ref_eval['correct'])
        np.testing.assert_array_equal(evaluation['counts'], ref_eval['counts'])
        np.testing.assert_allclose(evaluation['layer_density'], ref_eval['layer_density'])
        assert set(runner.trace_counts().values()) == {1}, runner.trace_counts()


@pytest.mark.slow
def test_train_and_evaluate_runs_the_configured_strategy(tmp_path):
    from spafl_jax import train  # pylint: disable=g-import-not-at-top

    config = default.get_config()
    config.update(
        num_clients=6,
        clients_per_round=3,
        rounds=2,
        local_epochs=1,
        client_execution='map',
    )
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary['rounds'] == 2
    assert summary['useful_step_fraction'] == 1.0  # 'map' runs real steps only


@pytest.mark.slow
def test_every_strategy_tests_as_the_reference_under_the_official_collapse_check(digits):
    """Under collapse_check='previous' a test changes the clients: the runner's test (chunks of 16
    test examples, batches of BATCH) must give what `federated.evaluate` gives, and leave the
    clients as `federated.tested_clients` does."""
    train, test, spec = digits
    model = models.create_model('digits_cnn', 10)
    cfg = client_lib.LocalConfig(batch_size=BATCH, collapse_check='previous')
    round_cfg = federated.RoundConfig(clients_per_round=SAMPLED)
    state = federated.init_state(
        model, cfg, jax.random.key(3), num_clients=NUM_CLIENTS, image_shape=(8, 8, 1)
    )
    # Clients 0-1: the first masked layer collapsed (thresholds above every row), flagged for
    # client 0 only; clients 2-3: flagged without being collapsed (a reset by a stale flag).
    first = lambda tree: jax.tree.leaves(tree)[0]
    collapse = jnp.arange(NUM_CLIENTS) < 2
    flagged = (jnp.arange(NUM_CLIENTS) == 0) | (jnp.arange(NUM_CLIENTS) >= 2) & (
        jnp.arange(NUM_CLIENTS) < 4
    )
    thresholds = jax.tree.map(lambda t: t + 0.05, state.clients.thresholds)
    leaves = jax.tree.leaves(thresholds)
    leaves[0] = jnp.where(collapse[:, None], 100.0, leaves[0])
    flags = jax.tree.map(lambda f: jnp.zeros_like(f), state.clients.collapsed)
    flag_leaves = jax.tree.leaves(flags)
    flag_leaves[0] = flagged
    clients = state.clients.replace(
        thresholds=jax.tree.unflatten(jax.tree.structure(thresholds), leaves),
        collapsed=jax.tree.unflatten(jax.tree.structure(flags), flag_leaves),
    )
    state = state.replace(clients=clients)
    ref_eval = federated.make_eval_fn(model, spec, batch_size=64, cfg=cfg)(clients, test)
    ref_tested = federated.tested_clients(cfg, clients, test.counts)
    # The reference itself: client 0 and the stale-flag clients reset; client 1 only if its test
    # has a second batch; the others keep their thresholds.
    counts = np.asarray(test.counts)
    reset = np.asarray(flagged) | (np.arange(NUM_CLIENTS) == 1) & (counts > BATCH)
    np.testing.assert_array_equal(
        np.all(np.asarray(first(ref_tested.thresholds)) == 0, axis=1), reset
    )
    for strategy, lanes in (('map', 1), ('vmap', 2)):
        runner = execution.RoundRunner(
            model, cfg, round_cfg, spec, train, test, strategy=strategy, lanes=lanes, eval_chunk=16
        )
        evaluation = runner.evaluate(state)
        np.testing.assert_array_equal(evaluation['correct'], ref_eval['correct'])
        np.testing.assert_allclose(evaluation['layer_density'], ref_eval['layer_density'])
        tested = runner.tested_state(state)
        jax.tree.map(
            np.testing.assert_array_equal,
            jax.device_get(tested.clients),
            jax.device_get(ref_tested),
        )


@pytest.mark.parametrize('strategy', ['map', 'vmap'])
def test_a_panel_evaluates_its_clients_as_the_full_sweep_does(digits, strategy):
    train, test, spec = digits
    model = models.create_model('digits_cnn', 10)
    cfg = client_lib.LocalConfig(batch_size=BATCH, local_epochs=1, lr=0.05, th_coeff=0.05)
    round_cfg = federated.RoundConfig(clients_per_round=SAMPLED, importance_update='all_after')
    state = federated.init_state(
        model,
        cfg,
        jax.random.key(3),
        num_clients=NUM_CLIENTS,
        image_shape=(8, 8, 1),
        lazy_importance=True,
    )
    runner = execution.RoundRunner(
        model, cfg, round_cfg, spec, train, test, strategy=strategy, lanes=2, eval_chunk=16
    )
    state, _ = _rounds(
        lambda s, d, sampled: runner.run_round(s, sampled, jax.random.key(7)), state, train
    )
    full = jax.device_get(runner.evaluate(state))
    panel = np.array([4, 0, 2])  # any order; clients with and without training
    part = jax.device_get(runner.evaluate_panel(state, panel))
    for key in ('correct', 'counts', 'layer_density', 'kept_weights'):
        np.testing.assert_array_equal(part[key], full[key][panel], err_msg=key)
    assert part['counts'].sum() > 0 and part['correct'].sum() > 0
    # The panel program is compiled once, whatever the round.
    runner.evaluate_panel(state, panel)
    assert runner.trace_counts()['evaluate_panel'] == 1
