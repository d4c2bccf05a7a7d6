"""Pieces the baselines share: the SpaFL models used densely, one SGD step, FLOPs and counting.

Each baseline is an `algorithm.Algorithm`; what differs between them is only what is trained
(weights, mask scores, a sub-model) and what the server does with it. The round, the batch
schedule, preprocessing and the backends are the library's, the same as SpaFL's.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spafl_jax import client as client_lib
from spafl_jax import masking
from spafl_jax import models
from spafl_jax.client import ClientState, LocalConfig

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


def check_full_batches(cfg: LocalConfig) -> None:
    if not cfg.drop_last:
        raise ValueError("drop_last=False is SpaFL's (the baselines train on full batches only).")


def sgd_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    params,
    opt_state,
    thresholds,
    batch_stats,
    x,
    y,
    lr,
    forward: Callable = lambda p: p,
):
    """One step of `tx` on the cross-entropy of the model with weights `forward(params)` (FedSpa:
    the weights on the client's mask). Returns (params, opt_state, batch_stats, loss, correct)."""

    def loss_fn(params):
        logits, new_stats = apply_train(model, forward(params), thresholds, batch_stats, x)
        ce, correct = cross_entropy(logits, y)
        return ce, (new_stats, correct)

    (loss, (batch_stats, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state)
    params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
    return params, opt_state, batch_stats, loss, correct


def step_metrics(loss, correct, flops, batch_size: int) -> dict:
    """`Algorithm.client_step`'s metrics of one full-batch step."""
    return {
        'loss': loss,
        'correct': correct.astype(jnp.float32),
        'steps': jnp.float32(1.0),
        'flops': jnp.asarray(flops, jnp.float32),
        'examples': jnp.float32(batch_size),
    }


def dense_client_step(model: nn.Module, cfg: LocalConfig, macs=None) -> Callable:
    """`Algorithm.client_step` of a client training a dense model's weights by plain cross-entropy
    (FedAvg, Local), with the runner's optimizer (clipping, momentum); `constants` is the learning
    rate."""
    check_full_batches(cfg)
    tx = client_lib.make_optimizer(cfg)

    def step(client: ClientState, opt_state, x, y, example_mask, lr, key):
        del example_mask, key  # full batches only; nothing drawn
        params, opt_state, batch_stats, loss, correct = sgd_step(
            model, tx, client.params, opt_state, client.thresholds, client.batch_stats, x, y, lr
        )
        metrics = step_metrics(
            loss, correct, dense_step_flops(macs, client.thresholds, cfg.batch_size), cfg.batch_size
        )
        return client.replace(params=params, batch_stats=batch_stats), opt_state, metrics

    return step


def fresh_optimizer(cfg: LocalConfig, params):
    """The optimizer state every baseline client starts a round with (momentum zero)."""
    return client_lib.make_optimizer(cfg).init(params)


def learning_rate(cfg: LocalConfig):
    """`Algorithm.round_constants` of the baselines: the round's learning rate."""
    return lambda state: client_lib.learning_rate(cfg, state.round)


def variables_of(client: ClientState) -> dict:
    return {
        'params': client.params,
        'thresholds': client.thresholds,
        'batch_stats': client.batch_stats,
    }


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
    return {
        'layer_density': jnp.broadcast_to(fractions, (num_clients, fractions.shape[0])),
        'kept_weights': jnp.broadcast_to(kept, (num_clients,)),
    }


# ----------------------------------------------------------------------------------------------------
# Counting (host side, exact Python ints).


def num_entries(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def num_masked_weights(variables: dict) -> int:
    """Weights of the masked layers' kernels (what SpaFL and FedPM mask)."""
    return num_entries(masking.kernels_of(variables['params'], variables['thresholds']))


def stack(trees: list):
    """Pytrees stacked on a new leading client axis.

    Client initialization runs eagerly, one client at a time, then stacks: for the small per-client
    init this is much faster than compiling `jit(vmap(init))`, whose compile alone takes seconds.
    """
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
