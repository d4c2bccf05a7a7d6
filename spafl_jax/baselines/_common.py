"""Pieces every baseline shares: the SpaFL models used densely, one generic local SGD loop, evaluation.

The baselines reuse the core's models, batch schedule, preprocessing, optimizer and padded-step masking;
what differs between them is only what is trained (weights, mask scores, a sub-model) and what the
server does with it. Nothing here edits the core: it composes `client` and `federated` functions.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spafl_jax import algorithm as algorithm_lib
from spafl_jax import client as client_lib
from spafl_jax import federated
from spafl_jax import masking
from spafl_jax import models
from spafl_jax import xla
from spafl_jax.client import ClientState, DataSpec, LocalConfig
from spafl_jax.federated import ClientData

# A threshold no row magnitude can fall below: every row of every masked layer is kept, i.e. the
# SpaFL models become ordinary dense models. Finite (not -inf) so `a - tau` stays a finite number.
DENSE_THRESHOLD = -1e30


def resolve_model(model_or_name: nn.Module | str, num_classes: int = 10) -> nn.Module:
    """A model instance from either an instance or a `models.MODELS` name."""
    if isinstance(model_or_name, str):
        return models.create_model(model_or_name, num_classes)
    return model_or_name


def dense_model(model: nn.Module) -> nn.Module:
    """The same model, made to carry no gradient through its (always-open) row masks.

    With thresholds at DENSE_THRESHOLD, `x = a - tau` is about 1e30. The `long_tailed` estimator is
    exactly 0 there, so the kernel's gradient is the plain dense gradient; `identity` and
    `outside_unit` would add a spurious term through the row magnitude.
    """
    if hasattr(model, 'estimator'):
        return model.clone(estimator='long_tailed')
    return model


def dense_thresholds(thresholds):
    return jax.tree.map(lambda t: jnp.full(t.shape, DENSE_THRESHOLD, jnp.float32), thresholds)


def init_dense_variables(model: nn.Module, rng: jax.Array, image_shape) -> dict:
    """`models.init_variables` with every threshold at DENSE_THRESHOLD (nothing is masked)."""
    variables = models.init_variables(model, rng, image_shape)
    variables['thresholds'] = dense_thresholds(variables['thresholds'])
    return variables


def apply_train(model: nn.Module, params, thresholds, batch_stats, x):
    """Training-mode forward: (logits, updated batch_stats)."""
    variables = {'params': params, 'thresholds': thresholds, 'batch_stats': batch_stats}
    logits, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return logits, updated.get('batch_stats', batch_stats)


def cross_entropy(logits, y):
    """(mean cross-entropy, number of correct predictions)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce, jnp.sum(jnp.argmax(logits, -1) == y)


# ----------------------------------------------------------------------------------------------------
# Local training. `loss_fn(trainable, extra, x, y, key) -> (loss, (extra, correct, step_flops))`:
# `trainable` is what SGD updates (weights, mask scores, ...), `extra` what the forward pass updates
# (BatchNorm statistics). The core's `local_update` hard-wires weights + thresholds and the threshold
# penalty; this is the same loop with the objective left to the caller.

def local_sgd(cfg: LocalConfig, spec: DataSpec, loss_fn: Callable, trainable, extra, images, labels,
              example_ids, count, rng, round_index, tx: optax.GradientTransformation | None = None):
    """`local_epochs` of clipped momentum SGD on one client's data, its real steps only.

    Args:
      cfg: local hyperparameters (the optimizer is fresh every round in all baselines).
      images, labels: the whole training set (all clients).
      example_ids: [max_count] this client's indices into the training set (padded).
      count: how many entries of example_ids are real.
      rng: the client's key for this round.
      tx: the optimizer before the -lr scaling; default the runner's (clip, momentum).
    Returns:
      (trainable, extra, metrics summed over the client's real steps).
    """
    if not cfg.drop_last:
        raise ValueError('drop_last=False is SpaFL\'s (the baselines train on full batches only).')
    lr = client_lib.learning_rate(cfg, round_index)
    schedule_rng, step_rng = jax.random.split(rng)
    batches, valid = client_lib.batch_schedule(schedule_rng, count, example_ids.shape[0],
                                               cfg.batch_size, cfg.local_epochs)
    keys = jax.random.split(step_rng, valid.shape[0])
    tx = client_lib.make_optimizer(cfg) if tx is None else tx
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(carry, index):
        trainable, extra, opt_state = carry
        augment_key, loss_key = jax.random.split(keys[index])
        ids = example_ids[batches[index]]
        x = client_lib.preprocess(spec, images[ids], augment_key)
        (loss, (extra, correct, flops)), grads = grad_fn(trainable, extra, x, labels[ids],
                                                         loss_key)
        updates, opt_state = tx.update(grads, opt_state)
        trainable = jax.tree.map(lambda p, u: p - lr * u, trainable, updates)
        metrics = {'loss': loss, 'correct': correct.astype(jnp.float32),
                   'steps': jnp.float32(1.0), 'flops': jnp.asarray(flops, jnp.float32),
                   'examples': jnp.float32(cfg.batch_size)}
        return (trainable, extra, opt_state), metrics

    (trainable, extra, _), metrics = client_lib.over_real_steps(
        cfg, body, (trainable, extra, tx.init(trainable)), count, example_ids.shape[0])
    return trainable, extra, metrics


def check_full_batches(cfg: LocalConfig) -> None:
    if not cfg.drop_last:
        raise ValueError('drop_last=False is SpaFL\'s (the baselines train on full batches only).')


def dense_client_step(model: nn.Module, cfg: LocalConfig, macs=None) -> Callable:
    """`Algorithm.client_step` of a client training a dense model's weights by plain cross-entropy
    (FedAvg, Local), with the runner's optimizer (clipping, momentum); `constants` is the learning
    rate."""
    check_full_batches(cfg)
    tx = client_lib.make_optimizer(cfg)

    def step(client: ClientState, opt_state, x, y, example_mask, lr, key):
        del example_mask, key   # full batches only; nothing drawn
        def loss_fn(params):
            logits, batch_stats = apply_train(model, params, client.thresholds,
                                              client.batch_stats, x)
            ce, correct = cross_entropy(logits, y)
            return ce, (batch_stats, correct)

        (loss, (batch_stats, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            client.params)
        updates, opt_state = tx.update(grads, opt_state)
        params = jax.tree.map(lambda p, u: p - lr * u, client.params, updates)
        metrics = {'loss': loss, 'correct': correct.astype(jnp.float32),
                   'steps': jnp.float32(1.0),
                   'flops': dense_step_flops(macs, client.thresholds, cfg.batch_size),
                   'examples': jnp.float32(cfg.batch_size)}
        return client.replace(params=params, batch_stats=batch_stats), opt_state, metrics

    return step


def fresh_optimizer(cfg: LocalConfig, params):
    """The optimizer state every baseline client starts a round with (momentum zero)."""
    return client_lib.make_optimizer(cfg).init(params)


def learning_rate(cfg: LocalConfig):
    """`Algorithm.round_constants` of the baselines: the round's learning rate."""
    return lambda state: client_lib.learning_rate(cfg, state.round)


def variables_of(client: ClientState) -> dict:
    return {'params': client.params, 'thresholds': client.thresholds,
            'batch_stats': client.batch_stats}


def map_clients(fn: Callable, args: tuple, execution: str):
    """`fn` over the leading (sampled-client) axis of every arg: vmap, or lax.map to save memory."""
    if execution == 'vmap':
        return jax.vmap(fn)(*args)
    if execution == 'map':
        return jax.lax.map(lambda a: fn(*a), args)
    raise ValueError(f'client_execution={execution!r}: use one of {algorithm_lib.CLIENT_EXECUTIONS}.')


def compile_round(run_round, model, local_cfg, round_cfg, spec, macs, method_cfg):
    """A baseline's `run_round` compiled once: (state, data, sampled, seed_key) -> (state, metrics),
    the input state donated."""
    return xla.jit(functools.partial(run_round, model, local_cfg, round_cfg, spec, macs=macs,
                                     method_cfg=method_cfg), donate_argnums=(0,), model=model)


# ----------------------------------------------------------------------------------------------------
# Aggregation.

def client_weights(aggregation: str, data: ClientData, sampled: jax.Array) -> jax.Array:
    """[sampled] aggregation weights: uniform (official SpaFL) or by training-set size."""
    if aggregation == 'data_size':
        return data.counts[sampled].astype(jnp.float32)
    if aggregation == 'uniform':
        return jnp.ones(sampled.shape, jnp.float32)
    raise ValueError(f'aggregation={aggregation!r}: use one of {algorithm_lib.AGGREGATIONS}.')


def masked_mean(values, holds, weights: jax.Array, previous):
    """Entry-wise weighted mean over the leading client axis of the clients that hold each entry.

    values, holds: pytrees of [clients, ...] (holds in {0, 1}, or None: every client holds every entry).
    Entries that no client holds keep their `previous` value.
    """
    def one(v, h, old):
        w = weights.reshape((-1,) + (1,) * (v.ndim - 1))
        if h is not None:
            w = w * h.astype(jnp.float32)
        total = jnp.sum(jnp.broadcast_to(w, v.shape), axis=0)
        mean = jnp.sum(w * v, axis=0) / jnp.maximum(total, 1e-12)
        return jnp.where(total > 0, mean, old)
    if holds is None:
        return jax.tree.map(lambda v, old: one(v, None, old), values, previous)
    return jax.tree.map(one, values, holds, previous)


# ----------------------------------------------------------------------------------------------------
# FLOPs (docs/algorithm.md, section 7): 3 x multiply-accumulates x kept fraction, per example.

def step_flops(macs, fractions, batch_size: int) -> jax.Array:
    """FLOPs of one step; `macs` and `fractions` are pytrees shaped like the thresholds."""
    if macs is None:
        return jnp.float32(0.0)
    per_example = sum(jax.tree.leaves(jax.tree.map(lambda m, f: m * f, macs, fractions)))
    return jnp.float32(3.0 * batch_size) * per_example


def dense_step_flops(macs, thresholds, batch_size: int) -> jax.Array:
    return step_flops(macs, jax.tree.map(lambda t: 1.0, thresholds), batch_size)


# ----------------------------------------------------------------------------------------------------
# Evaluation: the same dict as `federated.evaluate`.

def correct_per_client(model: nn.Module, spec: DataSpec, client_fn: Callable[[jax.Array], ClientState],
                       data: ClientData, batch_size: int) -> jax.Array:
    """[N] correct predictions of the model `client_fn(k)` on client k's own test examples."""
    def one(k, ids, n):
        return federated.evaluate_client(model, spec, client_fn(k), data.images, data.labels, ids, n,
                                         batch_size)
    num_clients = data.counts.shape[0]
    return federated.over_clients(one, jnp.arange(num_clients), data.example_ids, data.counts)


def weight_density(kernel_masks) -> tuple[jax.Array, jax.Array]:
    """Unstructured density of one model: ([L] kept-weight fraction per masked layer, kept weights).

    `kernel_masks` is shaped like the thresholds (one kernel-shaped leaf per masked layer), in the
    leaf order `federated.density_stats` uses.
    """
    leaves = jax.tree.leaves(kernel_masks)
    fractions = jnp.stack([jnp.mean(m.astype(jnp.float32)) for m in leaves])
    kept = sum(jnp.sum(m.astype(jnp.int32)) for m in leaves)
    return fractions, kept


def dense_density(thresholds, params, num_clients: int) -> dict:
    """Density stats of N dense models: every layer 1, every masked weight kept."""
    kernels = masking.kernels_of(params, thresholds)
    fractions, kept = weight_density(jax.tree.map(jnp.ones_like, kernels))
    return {'layer_density': jnp.broadcast_to(fractions, (num_clients, fractions.shape[0])),
            'kept_weights': jnp.broadcast_to(kept, (num_clients,))}


# ----------------------------------------------------------------------------------------------------
# Counting (host side, exact Python ints).

def num_entries(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def num_masked_weights(variables: dict) -> int:
    """Weights of the masked layers' kernels (what SpaFL and FedPM mask)."""
    return num_entries(masking.kernels_of(variables['params'], variables['thresholds']))


def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


def stack(trees: list):
    """Pytrees stacked on a new leading client axis.

    Client initialization runs eagerly, one client at a time, then stacks: for the small per-client
    init this is much faster than compiling `jit(vmap(init))`, whose compile alone takes seconds.
    """
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def take(tree, idx):
    return jax.tree.map(lambda x: x[idx], tree)


def put(tree, idx, values):
    return jax.tree.map(lambda x, v: x.at[idx].set(v), tree, values)

