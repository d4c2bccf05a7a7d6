"""Local training of one SpaFL client: the objective, one SGD step, and `local_epochs` over its data.

All functions are pure and work on one client; the round vmaps (or maps) them over the client axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from spafl_jax import masking


@flax.struct.dataclass
class ClientState:
    """Everything one client keeps between rounds. Stacked over clients, every leaf has a leading axis."""
    params: Any        # weights, BatchNorm scale/bias
    thresholds: Any    # one vector per masked layer: what is communicated
    batch_stats: Any   # BatchNorm running statistics ({} for models without BatchNorm)
    opt_state: Any     # momentum buffers when the optimizer persists across rounds, else ()


@dataclasses.dataclass(frozen=True)
class LocalConfig:
    """Static hyperparameters of local training (hashable: a change means a new compilation)."""
    batch_size: int = 32
    local_epochs: int = 1
    lr: float = 0.01
    lr_decay: float = 1.0
    min_lr: float = 0.0
    momentum: float = 0.9
    clip: float = 0.0             # global-norm clip over all trainable variables; 0 = none
    th_coeff: float = 1e-4        # weight of sum(exp(-tau)) in the loss
    penalty_warmup: bool = False  # scale the penalty by sigmoid(10 r - 5)
    persistent_optimizer: bool = False


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """How raw stored pixels become model inputs, inside the compiled step."""
    pixel_max: float = 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    normalize: bool = True        # False: feed raw 0..pixel_max values (official loaders)
    augment: str = 'none'         # 'none' or 'crop_flip' (random crop with 4 padding, horizontal flip)


def preprocess(spec: DataSpec, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    x = images.astype(jnp.float32)
    if spec.normalize:
        x = (x / spec.pixel_max - jnp.asarray(spec.mean)) / jnp.asarray(spec.std)
    if spec.augment == 'crop_flip' and rng is not None:
        x = _crop_flip(x, rng)
    return x


def _crop_flip(x: jax.Array, rng: jax.Array, pad: int = 4) -> jax.Array:
    n, h, w, _ = x.shape
    crop_rng, flip_rng = jax.random.split(rng)
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * pad + 1)
    crop = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1])))
    x = crop(padded, offsets)
    flip = jax.random.bernoulli(flip_rng, 0.5, (n, 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1, :], x)


def learning_rate(cfg: LocalConfig, round_index) -> jax.Array:
    return jnp.maximum(cfg.lr * cfg.lr_decay ** jnp.asarray(round_index, jnp.float32), cfg.min_lr)


def penalty_scale(cfg: LocalConfig, round_index) -> jax.Array:
    if cfg.penalty_warmup:
        return jax.nn.sigmoid(10.0 * jnp.asarray(round_index, jnp.float32) - 5.0)
    return jnp.ones((), jnp.float32)


def threshold_penalty(thresholds) -> jax.Array:
    """sum over masked layers and rows of exp(-tau): pushes thresholds up, towards sparsity."""
    return sum(jnp.sum(jnp.exp(-t)) for t in jax.tree.leaves(thresholds))


def make_optimizer(cfg: LocalConfig) -> optax.GradientTransformation:
    """Clip, then PyTorch-style momentum (no dampening); the caller scales by -lr."""
    clip = optax.clip_by_global_norm(cfg.clip) if cfg.clip > 0 else optax.identity()
    return optax.chain(clip, optax.trace(decay=cfg.momentum, nesterov=False))


def init_opt_state(cfg: LocalConfig, params, thresholds):
    if not cfg.persistent_optimizer:
        return ()
    return make_optimizer(cfg).init((params, thresholds))


def loss_fn(model: nn.Module, params, thresholds, batch_stats, x, y, penalty_coeff):
    """Cross-entropy + penalty_coeff * sum(exp(-tau)); returns (loss, (batch_stats, ce, correct))."""
    variables = {'params': params, 'thresholds': thresholds, 'batch_stats': batch_stats}
    logits, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss = ce + penalty_coeff * threshold_penalty(thresholds)
    correct = jnp.sum(jnp.argmax(logits, -1) == y)
    return loss, (updated.get('batch_stats', batch_stats), ce, correct)


def training_flops(params, thresholds, macs, batch_size) -> jax.Array:
    """FLOPs of one step as the paper counts them: 3 x sum(MACs x kept fraction) per example."""
    densities = masking.layer_densities(params, thresholds)
    per_example = sum(jax.tree.leaves(jax.tree.map(lambda m, d: m * d, macs, densities)))
    return 3.0 * batch_size * per_example


def local_step(model: nn.Module, cfg: LocalConfig, state: ClientState, opt_state, x, y, valid, lr,
               penalty_coeff, macs=None):
    """One SGD step. A step with `valid` False returns its inputs unchanged (padding of short clients)."""
    step_thresholds = masking.reset_collapsed_thresholds(state.params, state.thresholds)
    grad_fn = jax.value_and_grad(loss_fn, argnums=(1, 2), has_aux=True)
    (loss, (batch_stats, ce, correct)), grads = grad_fn(
        model, state.params, step_thresholds, state.batch_stats, x, y, penalty_coeff)
    tx = make_optimizer(cfg)
    updates, new_opt_state = tx.update(grads, opt_state)
    params, thresholds = jax.tree.map(lambda p, u: p - lr * u, (state.params, step_thresholds),
                                      updates)
    new_state = state.replace(params=params, thresholds=thresholds, batch_stats=batch_stats)
    keep = lambda new, old: jnp.where(valid, new, old)
    new_state = jax.tree.map(keep, new_state, state)
    new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    flops = jnp.float32(0.0)
    if macs is not None:  # the masks this step's forward pass used
        flops = training_flops(state.params, step_thresholds, macs, x.shape[0])
    v = valid.astype(jnp.float32)
    metrics = {'loss': ce * v, 'correct': correct * v, 'steps': v, 'flops': flops * v}
    return new_state, new_opt_state, metrics


def batch_schedule(rng, count, max_count: int, batch_size: int, epochs: int):
    """Shuffled batches of a client's own examples, padded to a shape every client shares.

    Returns positions [epochs * (max_count // batch_size), batch_size] into the client's example list
    and a validity flag per step: a client with `count` examples has `count // batch_size` real steps
    per epoch (the last partial batch is dropped), the rest are padding.
    """
    steps = max_count // batch_size
    position = jnp.arange(max_count)

    def one_epoch(key):
        order = jnp.argsort(jnp.where(position < count, jax.random.uniform(key, (max_count,)), 2.0))
        return order[:steps * batch_size].reshape(steps, batch_size)

    batches = jax.vmap(one_epoch)(jax.random.split(rng, epochs)).reshape(epochs * steps, batch_size)
    valid = jnp.tile(jnp.arange(steps) < count // batch_size, epochs)
    return batches, valid


def local_schedule(cfg: LocalConfig, rng, count, max_count: int):
    """A client's whole round of randomness from its key: batches, their validity, augment keys.

    Every execution strategy draws through this one function, so batches and augmentation depend on
    (seed, round, client id) and the padded table width only, never on how the steps are run.
    Returns positions [steps, batch_size], valid [steps] and keys [steps] with
    steps = local_epochs * (max_count // batch_size); step e * (max_count // batch_size) + s is the
    s-th batch of epoch e.
    """
    schedule_rng, augment_rng = jax.random.split(rng)
    batches, valid = batch_schedule(schedule_rng, count, max_count, cfg.batch_size,
                                    cfg.local_epochs)
    return batches, valid, jax.random.split(augment_rng, valid.shape[0])


def round_opt_state(cfg: LocalConfig, state: ClientState):
    """The optimizer state a client starts its local work with: kept, or fresh (zero momentum)."""
    if cfg.persistent_optimizer:
        return state.opt_state
    return make_optimizer(cfg).init((state.params, state.thresholds))


def over_real_steps(cfg: LocalConfig, body, carry, count, max_count: int):
    """Runs `carry, metrics = body(carry, index)` for a client's real local steps only, in order.

    `index` is the step's row in `local_schedule`: the s-th real step of epoch e is row
    e * (max_count // batch_size) + s. The loop's trip count is the client's own number of real
    steps, so a small client does not pay for the largest one's padding (under `vmap` the lanes run
    to the longest lane, and the extra iterations are discarded). Returns (carry, metrics summed over
    the steps).
    """
    stride = max_count // cfg.batch_size
    per_epoch = count // cfg.batch_size
    safe_per_epoch = jnp.maximum(per_epoch, 1)
    metrics_shape = jax.eval_shape(lambda c: body(c, jnp.int32(0))[1], carry)
    zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics_shape)

    def step(t, loop_carry):
        carry, sums = loop_carry
        index = (t // safe_per_epoch) * stride + t % safe_per_epoch
        carry, metrics = body(carry, index)
        return carry, jax.tree.map(jnp.add, sums, metrics)

    return jax.lax.fori_loop(0, per_epoch * cfg.local_epochs, step, (carry, zeros))


def local_update(model: nn.Module, cfg: LocalConfig, spec: DataSpec, state: ClientState, images,
                 labels, example_ids, count, rng, round_index, macs=None):
    """`local_epochs` of SGD on one client's data.

    Args:
      state: the client's state, thresholds already set to the server's.
      images, labels: the whole training set (all clients), [n_train, h, w, c] and [n_train].
      example_ids: [max_count] this client's indices into the training set (padded).
      count: how many entries of example_ids are real.
      rng: the client's key for this round.
      round_index: 0-based round (learning rate decay, penalty warm-up).
    Returns:
      (new state, metrics summed over the client's real steps).
    """
    lr = learning_rate(cfg, round_index)
    penalty_coeff = cfg.th_coeff * penalty_scale(cfg, round_index)
    batches, _, keys = local_schedule(cfg, rng, count, example_ids.shape[0])

    def body(carry, index):
        client, opt = carry
        ids = example_ids[batches[index]]
        x = preprocess(spec, images[ids], keys[index])
        client, opt, metrics = local_step(model, cfg, client, opt, x, labels[ids], jnp.bool_(True),
                                          lr, penalty_coeff, macs)
        return (client, opt), metrics

    (state, opt_state), metrics = over_real_steps(
        cfg, body, (state, round_opt_state(cfg, state)), count, example_ids.shape[0])
    if cfg.persistent_optimizer:
        state = state.replace(opt_state=opt_state)
    return state, metrics
