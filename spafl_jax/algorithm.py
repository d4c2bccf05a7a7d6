"""A federated algorithm as a value, and the one round that drives any of them.

An `Algorithm` is a handful of pure functions: what a sampled client starts its local work from,
one local step, what the client keeps and what it sends, and what the server makes of the mean of
what was sent. A round is the same for every algorithm (docs/algorithm.md, section 3):

  1. the sampled clients' stored states are gathered and each starts its local work:
     `client_start(state, stored, key) -> (client, opt_state)` (SpaFL: tau_g broadcast; FedAvg: a
     copy of the global model);
  2. each runs its real local steps, in the order `client.local_schedule` draws from
     (seed, round, client id): `client_step(client, opt_state, x, y, example_mask, constants, key)
     -> (client, opt_state, metrics)`, with `constants = round_constants(state)` (what every
     client's steps share this round: the learning rate...);
  3. each ends: an algorithm that needs one more look at its data after training (FedSpa's regrow
     gradient) has `client_final(client, opt_state, x, y, constants, key) -> (client, metrics)`
     called on one batch drawn for the purpose (`final_batch`); then
     `client_end(client, opt_state) -> (stored, message)`: what it keeps, what it sends;
  4. the server takes the weighted mean of the messages, added in client-id order whatever device
     ran which client (`server.aggregate`, gathered over the mesh when the clients are sharded:
     `end_round` is its only caller) and
     `server_update(state, mean, clients) -> state` gives the next state from it and every client's
     stored state, the trained ones already written back.

`run_round` below is the readable reference: the sampled clients vmapped (or `lax.map`ped) on one
device. `execution.RoundRunner` is the backend the runner uses: the same functions on a `clients`
mesh, clients packed onto lanes, across hosts. Neither knows what an algorithm's state holds.

The state an algorithm works on is a flax struct dataclass (`Algorithm.state_type`) with a field
`clients`, whose leaves are `[num_clients, ...]` (sharded along the mesh; `()` when clients keep
nothing between rounds, as in FedAvg) and a field `round` (rounds completed); every other field is
the server's and replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from spafl_jax import client as client_lib
from spafl_jax import server
from spafl_jax.client import DataSpec, LocalConfig

CLIENT_EXECUTIONS = ('vmap', 'map')
AGGREGATIONS = ('uniform', 'data_size')
METRICS = ('loss', 'correct', 'steps', 'flops', 'examples')  # what `client_step` returns


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A federated algorithm: the functions one round calls (see the module docstring).

    Training:
      round_constants(state) -> what every local step of the round shares: the learning rate,
        and whatever else is the same for every client (FedPM: the frozen weights).
      client_start(state, stored, key) -> (client, opt_state) of one sampled client; `key` is the
        client's own for the round, from (seed, round, client id).
      client_step(client, opt_state, x, y, example_mask, constants, key) -> (client, opt_state,
        metrics): one step on a preprocessed batch; `example_mask` [batch] marks the real examples
        of a partial batch, or is None; `key` is the step's (the one its augmentation used: derive
        new randomness from it with `jax.random.fold_in`); metrics are the scalars named in
        `METRICS` (steps = 1).
      client_final(client, opt_state, x, y, constants, key) -> (client, metrics), optional: once
        after the local steps, on one preprocessed batch of the client's own data (`final_batch`;
        no augmentation), with a key of its own; metrics as `client_step`'s (steps = 0).
      client_end(client, opt_state) -> (stored, message).
      server_update(state, mean_message, clients) -> the next state (its `round` one higher).
    The mean's weights are the round's (`aggregation_weights`) unless `aggregation` fixes them.
    Evaluation (each client on its own test split, with the model `model`):
      eval_variables(state, stored, count) -> (first, rest): the model variables of the client's
        first test batch of `first_test_batch` examples and of the later ones (the same unless a
        test changes the model as it runs, as SpaFL's official collapse check does).
      eval_density(state, clients, counts) -> {'layer_density': [n, L], 'kept_weights': [n]}.
      tested(state, clients, counts) -> the clients as their test leaves them.
    """

    name: str
    model: nn.Module
    state_type: type
    round_constants: Callable[..., Any]
    client_start: Callable[..., Any]
    client_step: Callable[..., Any]
    client_end: Callable[..., Any]
    server_update: Callable[..., Any]
    eval_variables: Callable[..., Any]
    eval_density: Callable[..., Any]
    tested: Callable[..., Any] = None  # default: `unchanged`
    client_final: Callable[..., Any] | None = None
    first_test_batch: int = 0
    aggregation: str | None = None  # the mean's weights if the method fixes them (AGGREGATIONS)

    def __post_init__(self):
        if self.tested is None:
            object.__setattr__(self, 'tested', unchanged)


def unchanged(state, clients, counts):
    """`Algorithm.tested` of an algorithm whose test leaves the clients as they are."""
    del state, counts
    return clients


def keeps_clients(state) -> bool:
    """Whether the clients keep a state of their own between rounds."""
    return bool(jax.tree.leaves(state.clients))


def state_specs(alg: Algorithm, sharded, replicated):
    """A prefix of the algorithm's state: `sharded` for the clients, `replicated` for the rest."""
    return alg.state_type(
        **{
            f.name: sharded if f.name == 'clients' else replicated
            for f in dataclasses.fields(alg.state_type)
        }
    )


def aggregation_weights(aggregation: str, counts: jax.Array, real: jax.Array) -> jax.Array:
    """[sampled] weights of the mean: equal ('uniform', the official code), or the training-set
    sizes ('data_size'); 0 where `real` is False (an empty position)."""
    if aggregation == 'data_size':
        return jnp.where(real, counts, 0).astype(jnp.float32)
    return real.astype(jnp.float32)


def start_clients(alg: Algorithm, state, stored, keys):
    """Step 1 for the gathered clients (`stored` `[n, ...]`, or () when clients keep nothing) with
    their `[n]` round keys: (clients, optimizer states), each `[n, ...]`."""
    return jax.vmap(lambda s, k: alg.client_start(state, s, k))(stored, keys)


def masked_step(alg: Algorithm, client, opt_state, x, y, example_mask, constants, key, valid):
    """`client_step`, or nothing where `valid` is False (a padded step of a short client)."""
    new_client, new_opt, metrics = alg.client_step(
        client, opt_state, x, y, example_mask, constants, key
    )
    keep = lambda new, old: jnp.where(valid, new, old)
    return (
        jax.tree.map(keep, new_client, client),
        jax.tree.map(keep, new_opt, opt_state),
        jax.tree.map(lambda m: m * valid.astype(m.dtype), metrics),
    )


def end_round(
    alg: Algorithm,
    state,
    trained,
    opt_state,
    weights,
    write_back,
    order: jax.Array,
    axis_name: str | None = None,
):
    """Steps 3-4: the trained clients end, the server averages their messages and updates.

    `trained`, `opt_state`, `weights` are the `[n, ...]` trained clients (weight 0: an empty
    position); `write_back(clients, stored)` puts their stored states into all of `state.clients`.
    The mean adds the messages in `order` (`client_order`: by client id). With `axis_name` the
    clients are sharded along it and gathered over it first (`server.aggregate`).
    """
    stored, messages = jax.vmap(alg.client_end)(trained, opt_state)
    mean = server.aggregate(messages, weights, axis_name=axis_name, order=order)
    return alg.server_update(state, mean, write_back(state.clients, stored))


def client_order(sampled: jax.Array, count: int) -> jax.Array:
    """[count] positions of `sampled` (client ids, -1: an empty position) by increasing client id,
    empty positions last: the order in which a round's messages and metrics are added, so that
    the sums do not depend on where the clients ran."""
    last = jnp.iinfo(sampled.dtype).max
    return jnp.argsort(jnp.where(sampled >= 0, sampled, last))[:count]


def client_keys(seed_key: jax.Array, round_index, client_ids: jax.Array) -> jax.Array:
    """Randomness derives from (seed, round, client id) only."""
    round_key = jax.random.fold_in(seed_key, round_index)
    return jax.vmap(lambda c: jax.random.fold_in(round_key, c))(client_ids)


def local_work(
    alg: Algorithm,
    cfg: LocalConfig,
    spec: DataSpec,
    client,
    opt_state,
    constants,
    images,
    labels,
    example_ids,
    count,
    key,
):
    """Step 2 for one client: its real local steps, each on the batch `local_schedule` drew.

    `images`, `labels` are the whole training set; `example_ids` [max_count] the client's indices
    into it (padded), `count` how many are real. Returns (client, opt_state, metrics summed over
    its steps).
    """
    max_count = example_ids.shape[0]
    batches, _, keys = client_lib.local_schedule(cfg, key, count, max_count)

    def body(carry, index):
        client, opt_state = carry
        positions = batches[index]
        ids = client_lib.example_ids_of(example_ids, positions)
        x = client_lib.preprocess(spec, images[ids], keys[index])
        client, opt_state, metrics = alg.client_step(
            client,
            opt_state,
            x,
            labels[ids],
            client_lib.example_mask(cfg, positions, count),
            constants,
            keys[index],
        )
        return (client, opt_state), metrics

    (client, opt_state), metrics = client_lib.over_real_steps(
        cfg, body, (client, opt_state), count, max_count
    )
    return client, opt_state, metrics


# The stream of a client's round key that `client_final` draws from (`local_schedule` splits the
# key itself, so a fold-in cannot collide with its draws).
FINAL_STREAM = 0x46494E


def final_batch(cfg: LocalConfig, key: jax.Array, count, example_ids: jax.Array):
    """The batch `client_final` sees and its key: ([batch_size] dataset ids, key), drawn from the
    client's round key alone."""
    batch_key, final_key = jax.random.split(jax.random.fold_in(key, FINAL_STREAM))
    positions, _ = client_lib.batch_schedule(
        batch_key, count, example_ids.shape[0], batch_size=cfg.batch_size, epochs=1
    )
    return client_lib.example_ids_of(example_ids, positions[0]), final_key


def finish_clients(
    alg: Algorithm,
    spec: DataSpec,
    clients,
    opt_state,
    constants,
    images,
    labels,
    final_ids,
    final_keys,
):
    """`client_final` for `[n, ...]` trained clients on their `final_batch`es: (clients, metrics)."""

    def one(client, opt, ids, key):
        x = client_lib.preprocess(spec, images[ids], None)
        return alg.client_final(client, opt, x, labels[ids], constants, key)

    return jax.vmap(one)(clients, opt_state, final_ids, final_keys)


def take(tree, idx):
    return jax.tree.map(lambda x: x[idx], tree)


def put(tree, idx, values):
    return jax.tree.map(lambda x, v: x.at[idx].set(v), tree, values)


def run_round(
    alg: Algorithm,
    cfg: LocalConfig,
    spec: DataSpec,
    state,
    data,
    sampled: jax.Array,
    seed_key: jax.Array,
    *,
    aggregation: str = 'uniform',
    client_execution: str = 'vmap',
):
    """One round of `alg` for the `[clients_per_round]` ids `sampled` on one device: the readable
    reference of `execution.RoundRunner`. `data` is a `federated.ClientData`; returns
    (next state, `round_metrics`)."""
    if client_execution not in CLIENT_EXECUTIONS:
        raise ValueError(
            f'client_execution={client_execution!r}; use one of {", ".join(CLIENT_EXECUTIONS)}.'
        )
    keys = client_keys(seed_key, state.round, sampled)
    clients, opt_state = start_clients(alg, state, take(state.clients, sampled), keys)
    constants = alg.round_constants(state)
    counts = data.counts[sampled]

    def one(client, opt, example_ids, count, key):
        return local_work(
            alg,
            cfg,
            spec,
            client,
            opt,
            constants,
            data.images,
            data.labels,
            example_ids,
            count,
            key,
        )

    args = (clients, opt_state, data.example_ids[sampled], counts, keys)
    if client_execution == 'vmap':
        clients, opt_state, metrics = jax.vmap(one)(*args)
    else:
        clients, opt_state, metrics = jax.lax.map(lambda a: one(*a), args)
    if alg.client_final is not None:
        final_ids, final_keys = jax.vmap(lambda k, c, e: final_batch(cfg, k, c, e))(
            keys, counts, data.example_ids[sampled]
        )
        clients, final_metrics = finish_clients(
            alg,
            spec,
            clients,
            opt_state,
            constants,
            data.images,
            data.labels,
            final_ids,
            final_keys,
        )
        metrics = jax.tree.map(jnp.add, metrics, final_metrics)
    weights = aggregation_weights(
        alg.aggregation or aggregation, counts, jnp.ones(counts.shape, bool)
    )
    order = client_order(sampled, sampled.shape[0])
    new_state = end_round(
        alg,
        state,
        clients,
        opt_state,
        weights,
        lambda everyone, stored: put(everyone, sampled, stored),
        order,
    )
    executed = executed_steps(metrics['steps'], client_execution)
    metrics = {**take(metrics, order), 'real': jnp.ones(order.shape, jnp.float32)}
    return new_state, round_metrics(metrics, executed)


def executed_steps(steps: jax.Array, client_execution: str) -> jax.Array:
    """Local steps `run_round` executes for clients of `steps` [S] real steps, padding included:
    under 'vmap' every client's loop runs as long as the longest client's; under 'map' each
    client runs its own steps only."""
    return steps.shape[0] * jnp.max(steps) if client_execution == 'vmap' else jnp.sum(steps)


def make_round_fn(
    alg: Algorithm,
    cfg: LocalConfig,
    spec: DataSpec,
    *,
    aggregation: str = 'uniform',
    client_execution: str = 'vmap',
):
    """`run_round` compiled once with plain `jax.jit`: (state, data, sampled, seed_key) -> (state,
    metrics). The state passed in is donated: its buffers are reused for the next one, so do not
    read it afterwards. (`execution.RoundRunner` adds the compiler options a model runs fastest
    with, `hardware.jit`.)"""
    return jax.jit(
        functools.partial(
            run_round, alg, cfg, spec, aggregation=aggregation, client_execution=client_execution
        ),
        donate_argnums=(0,),
    )


def round_metrics(metrics, executed) -> dict:
    """A round's scalar metrics from the sampled clients' summed metrics (`METRICS`, `[S]` each,
    in `client_order`, and `real` [S]: 1 for a sampled client, 0 for an empty position), every
    sum added in that order (`server.ordered_sum`): the same bits on any number of devices.

    `executed` counts the local steps the round ran, padding included, so that
    `local_steps / max_steps` is the useful-step fraction of every method and backend.
    """
    ones = jnp.ones_like(metrics['real'])
    total = lambda x: server.ordered_sum(x, ones)
    steps = total(metrics['steps'])
    return {
        'train_loss': total(metrics['real'] * metrics['loss'] / jnp.maximum(metrics['steps'], 1.0))
        / jnp.maximum(total(metrics['real']), 1.0),
        'train_accuracy': total(metrics['correct']) / jnp.maximum(total(metrics['examples']), 1.0),
        'local_steps': steps,
        'flops': total(metrics['flops']),
        'max_steps': jnp.asarray(executed, jnp.float32),
    }


def evaluate_client(
    alg: Algorithm,
    spec: DataSpec,
    state,
    stored,
    images,
    labels,
    example_ids,
    count,
    batch_size: int,
):
    """Correct predictions of one client's model on its own (padded) test examples; only the
    batches that hold real examples run."""
    first, rest = alg.eval_variables(state, stored, count)
    if alg.first_test_batch:  # no batch may straddle the first test batch's end
        batch_size = math.gcd(batch_size, alg.first_test_batch)
    num_batches = -(-example_ids.shape[0] // batch_size)
    padded = jnp.pad(example_ids, (0, num_batches * batch_size - example_ids.shape[0]))

    def body(b, correct):
        start = b * batch_size
        ids = jax.lax.dynamic_slice(padded, (start,), (batch_size,))
        variables = jax.tree.map(
            lambda x, y: jnp.where(start < alg.first_test_batch, x, y), first, rest
        )
        logits = alg.model.apply(
            variables, client_lib.preprocess(spec, images[ids], None), train=False
        )
        hit = (jnp.argmax(logits, -1) == labels[ids]) & (start + jnp.arange(batch_size) < count)
        return correct + jnp.sum(hit, dtype=jnp.int32)

    return jax.lax.fori_loop(
        0, (count + batch_size - 1) // batch_size, body, jnp.zeros((), jnp.int32)
    )


def evaluate(alg: Algorithm, spec: DataSpec, state, data, *, batch_size: int) -> dict:
    """Every client on its own test split (`data`, a `federated.ClientData`), one after another:
    the reference of `execution.RoundRunner.evaluate`. Returns correct [N], counts [N],
    layer_density [N, L] and kept_weights [N]."""

    def one(args):
        stored, example_ids, count = args
        return evaluate_client(
            alg,
            spec,
            state,
            stored,
            data.images,
            data.labels,
            example_ids,
            count,
            batch_size=batch_size,
        )

    correct = jax.lax.map(one, (state.clients, data.example_ids, data.counts))
    return {
        'correct': correct,
        'counts': data.counts,
        **alg.eval_density(state, state.clients, data.counts),
    }


def make_eval_fn(alg: Algorithm, spec: DataSpec, *, batch_size: int):
    """`evaluate` compiled once: (state, data) -> the evaluation dict."""
    return jax.jit(functools.partial(evaluate, alg, spec, batch_size=batch_size))
