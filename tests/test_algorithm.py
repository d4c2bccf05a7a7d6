"""`algorithm.Algorithm`: a toy algorithm, written here, runs through every backend with equal results.

The toy is FedAvg whose clients also keep a state of their own between rounds (how many local
steps each has run, plus 1000 for every `client_final` call, whose batch's label sum it reports as
its FLOPs), so the backends' gather, training, final batch, scatter and mean are all exercised by
an algorithm the library has never seen: the reference round (`algorithm.run_round`, vmapped and
mapped) and `execution.RoundRunner` with each execution strategy must give the same state, the
same metrics and the same evaluation.
"""

from __future__ import annotations

import ast
import glob
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spafl_jax
from spafl_jax import algorithm
from spafl_jax import client as client_lib
from spafl_jax import data as data_lib
from spafl_jax import execution
from spafl_jax import federated
from spafl_jax import layers

NUM_CLIENTS, SAMPLED, ROUNDS = 6, 3, 3


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(layers.MaskedDense(12)(x.reshape(x.shape[0], -1)))
        return layers.MaskedDense(10)(x)


@flax.struct.dataclass
class ToyState:
    variables: dict  # the global model
    clients: jax.Array  # [num_clients] local steps each client has run so far
    round: jax.Array


def toy_fedavg(model: nn.Module, cfg: client_lib.LocalConfig) -> algorithm.Algorithm:
    tx = client_lib.make_optimizer(cfg)

    def client_start(state, steps_so_far, key):
        del key
        return (state.variables, steps_so_far), tx.init(state.variables['params'])

    def client_step(client, opt_state, x, y, example_mask, lr, key):
        del example_mask, key
        variables, steps = client

        def loss_fn(params):
            logits = model.apply({**variables, 'params': params}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
        updates, opt_state = tx.update(grads, opt_state)
        params = jax.tree.map(lambda p, u: p - lr * u, variables['params'], updates)
        metrics = {
            'loss': loss,
            'correct': jnp.sum(jnp.argmax(logits, -1) == y, dtype=jnp.float32),
            'steps': jnp.float32(1.0),
            'flops': jnp.float32(0.0),
            'examples': jnp.float32(y.shape[0]),
        }
        return ({**variables, 'params': params}, steps + 1), opt_state, metrics

    def client_final(client, opt_state, x, y, lr, key):
        del opt_state, x, lr, key
        variables, steps = client
        metrics = {
            'loss': jnp.float32(0.0),
            'correct': jnp.float32(0.0),
            'steps': jnp.float32(0.0),
            'flops': jnp.sum(y).astype(jnp.float32),
            'examples': jnp.float32(0.0),
        }
        return (variables, steps + 1000), metrics

    def client_end(client, opt_state):
        del opt_state
        variables, steps = client
        return steps, variables['params']

    def server_update(state, mean_params, clients):
        return state.replace(
            variables={**state.variables, 'params': mean_params},
            clients=clients,
            round=state.round + 1,
        )

    def eval_variables(state, steps_so_far, count):
        del steps_so_far, count
        return state.variables, state.variables

    def eval_density(state, clients, counts):
        del clients
        layers_ = len(jax.tree.leaves(state.variables['thresholds']))
        return {
            'layer_density': jnp.ones((counts.shape[0], layers_)),
            'kept_weights': jnp.zeros(counts.shape, jnp.int32),
        }

    return algorithm.Algorithm(
        name='toy_fedavg',
        model=model,
        state_type=ToyState,
        round_constants=lambda state: client_lib.learning_rate(cfg, state.round),
        client_start=client_start,
        client_step=client_step,
        client_final=client_final,
        client_end=client_end,
        server_update=server_update,
        eval_variables=eval_variables,
        eval_density=eval_density,
    )


@pytest.fixture(scope='module')
def setup():
    dataset = data_lib.load_digits()
    train, test = federated.split_clients(dataset, NUM_CLIENTS, alpha=0.5, min_train_examples=16)
    model = TinyMLP()
    cfg = client_lib.LocalConfig(batch_size=16, local_epochs=2, lr=0.05)
    spec = client_lib.DataSpec(pixel_max=16.0, mean=dataset.mean, std=dataset.std)
    variables = dict(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
    state = ToyState(
        variables=variables,
        clients=jnp.zeros(NUM_CLIENTS, jnp.int32),
        round=jnp.zeros((), jnp.int32),
    )
    return train, test, model, cfg, spec, state


def _sampled(r: int) -> np.ndarray:
    return np.sort(np.random.default_rng(r).choice(NUM_CLIENTS, SAMPLED, replace=False))


def _reference(setup, client_execution: str):
    train, test, model, cfg, spec, state = setup
    alg = toy_fedavg(model, cfg)
    round_fn = jax.jit(
        lambda s, sampled: algorithm.run_round(
            alg, cfg, spec, s, train, sampled, jax.random.key(1), client_execution=client_execution
        )
    )
    for r in range(ROUNDS):
        state, metrics = round_fn(state, jnp.asarray(_sampled(r)))
    return state, metrics, algorithm.evaluate(alg, spec, state, test, batch_size=32)


def _runner(setup, strategy: str):
    train, test, model, cfg, spec, state = setup
    runner = execution.RoundRunner(
        model,
        cfg,
        federated.RoundConfig(clients_per_round=SAMPLED),
        spec,
        train,
        test,
        strategy=strategy,
        lanes=2,
        eval_chunk=16,
        algorithm=toy_fedavg(model, cfg),
    )
    state = jax.tree.map(jnp.copy, state)  # the runner donates its input state
    for r in range(ROUNDS):
        state, metrics = runner.run_round(state, _sampled(r), jax.random.key(1))
    assert set(runner.trace_counts().values()) == {1}  # compiled once for every round
    return state, metrics, runner.evaluate(state)


def test_a_new_algorithm_runs_through_every_backend_with_equal_results(setup):
    expected_state, expected_metrics, expected_eval = _reference(setup, 'vmap')
    # The clients' own state: every sampled client ran its real steps, the others none.
    steps_per_epoch = np.asarray(client_lib.steps_per_epoch(setup[3], np.asarray(setup[0].counts)))
    runs = np.zeros(NUM_CLIENTS, np.int64)
    for r in range(ROUNDS):
        runs[_sampled(r)] += 2 * steps_per_epoch[_sampled(r)] + 1000
    np.testing.assert_array_equal(expected_state.clients, runs)
    assert float(expected_metrics['local_steps']) == 2 * steps_per_epoch[_sampled(ROUNDS - 1)].sum()
    # One final batch of 16 of its own labels per sampled client (digits 0-9: sum 0 to 144).
    assert 0 < float(expected_metrics['flops']) <= SAMPLED * 16 * 9
    accuracy = float(jnp.mean(expected_eval['correct'] / expected_eval['counts']))
    assert accuracy > 0.5, accuracy  # it learns (chance: 0.1)

    others = {'reference map': _reference(setup, 'map')}
    others.update({f'runner {s}': _runner(setup, s) for s in ('map', 'vmap')})
    for name, (state, metrics, evaluation) in others.items():
        for want, got in zip(jax.tree.leaves(expected_state), jax.tree.leaves(state)):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=name)
        for key in ('train_loss', 'train_accuracy', 'local_steps', 'flops'):
            assert float(metrics[key]) == pytest.approx(float(expected_metrics[key]), rel=1e-5), (
                name,
                key,
            )
        np.testing.assert_array_equal(evaluation['correct'], expected_eval['correct'], name)


def test_the_round_calls_the_aggregation_once():
    """One round for every algorithm and backend: the library calls `server.aggregate` in one
    place (`algorithm.end_round`)."""
    callers = []
    for path in sorted(
        glob.glob(os.path.join(os.path.dirname(spafl_jax.__file__), '**', '*.py'), recursive=True)
    ):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == 'aggregate'
            ):
                callers.append(os.path.relpath(path, os.path.dirname(spafl_jax.__file__)))
    assert callers == ['algorithm.py'], callers
