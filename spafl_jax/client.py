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

from spafl_jax import checks
from spafl_jax import masking


@flax.struct.dataclass
class ClientState:
    """Everything one client keeps between rounds. Stacked over clients, every leaf has a leading axis."""

    params: Any  # weights, BatchNorm scale/bias
    thresholds: Any  # one vector per masked layer: what is communicated
    batch_stats: Any  # BatchNorm running statistics ({} for models without BatchNorm)
    opt_state: Any  # momentum buffers when the optimizer persists across rounds, else ()
    # Under `collapse_check='previous'`: per masked layer, whether the mask of the client's last
    # forward pass (training step or test batch) kept at most 1 % of its rows. Else ().
    collapsed: Any = ()
    # The lazy importance update (`server.lazy_importance_update`), shaped like `thresholds` when
    # `importance_update='all_after'` runs lazily, else (): each kernel row's sum as the eager
    # update would see it, and the shift accumulated since the client last trained. The stored
    # kernel is the one the client last trained; its current weights are `kernel - shift`
    # (`server.apply_shifts`, which every reader of the weights goes through).
    row_sums: Any = ()
    shifts: Any = ()


@dataclasses.dataclass(frozen=True)
class LocalConfig:
    """Static hyperparameters of local training (hashable: a change means a new compilation)."""

    batch_size: int = 32
    local_epochs: int = 1
    lr: float = 0.01
    lr_decay: float = 1.0
    min_lr: float = 0.0
    momentum: float = 0.9
    clip: float = 0.0  # global-norm clip over all trainable variables; 0 = none
    th_coeff: float = 1e-4  # weight of sum(exp(-tau)) in the loss
    penalty_warmup: bool = False  # scale the penalty by sigmoid(10 r - 5)
    persistent_optimizer: bool = False
    drop_last: bool = True  # drop each epoch's last partial batch; False: train on it too
    # When a collapsed layer (at most 1 % of rows kept) has its thresholds reset to 0: 'current'
    # checks the mask about to be used; 'previous' checks the mask of the client's previous forward
    # pass, training or test, as the official code does (`ClientState.collapsed`).
    collapse_check: str = 'current'

    def __post_init__(self):
        name = type(self).__name__
        for field in ('batch_size', 'local_epochs'):
            checks.number(name, field, getattr(self, field), positive=True, integer=True)
        checks.number(name, 'lr', self.lr, non_negative=True)
        checks.number(name, 'lr_decay', self.lr_decay, positive=True, at_most=1.0)
        for field in ('min_lr', 'clip', 'th_coeff'):
            checks.number(name, field, getattr(self, field), non_negative=True)
        checks.number(name, 'momentum', self.momentum, non_negative=True, at_most=1.0)
        for field in ('penalty_warmup', 'persistent_optimizer', 'drop_last'):
            checks.boolean(name, field, getattr(self, field))
        checks.choice(name, 'collapse_check', self.collapse_check, COLLAPSE_CHECKS)


COLLAPSE_CHECKS = ('current', 'previous')
AUGMENTATIONS = ('none', 'crop_flip')


def steps_per_epoch(cfg: LocalConfig, count):
    """Local steps per epoch of a client holding `count` examples (ints or arrays): its full
    batches, plus the last partial one unless `cfg.drop_last`."""
    if cfg.drop_last:
        return count // cfg.batch_size
    return (count + cfg.batch_size - 1) // cfg.batch_size


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """How raw stored pixels become model inputs, inside the compiled step."""

    pixel_max: float = 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    normalize: bool = True  # False: feed raw 0..pixel_max values (official loaders)
    augment: str = 'none'  # 'none' or 'crop_flip' (random crop with 4 padding, horizontal flip)

    def __post_init__(self):
        name = type(self).__name__
        checks.number(name, 'pixel_max', self.pixel_max, positive=True)
        if len(self.mean) != len(self.std):
            raise checks.ConfigError(
                f'{name}.mean={self.mean!r} and {name}.std={self.std!r} need '
                'one value per channel each.'
            )
        for i, value in enumerate(self.std):
            checks.number(name, f'std[{i}]', value, positive=True)
        checks.boolean(name, 'normalize', self.normalize)
        checks.choice(name, 'augment', self.augment, AUGMENTATIONS)


def preprocess(spec: DataSpec, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    x = images.astype(jnp.promote_types(images.dtype, jnp.float32))  # float64 stays float64
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
    crop = jax.vmap(
        lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
    )
    x = crop(padded, offsets)
    flip = jax.random.bernoulli(flip_rng, 0.5, (n, 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1, :], x)


# The schedules below compute in JAX's default float type: float32, or float64 under
# `jax.enable_x64` (where tests/test_reference.py replays the official code's float64 traces).


def learning_rate(cfg: LocalConfig, round_index) -> jax.Array:
    return jnp.maximum(cfg.lr * cfg.lr_decay ** jnp.asarray(round_index, float), cfg.min_lr)


def penalty_scale(cfg: LocalConfig, round_index) -> jax.Array:
    if cfg.penalty_warmup:
        return jax.nn.sigmoid(10.0 * jnp.asarray(round_index, float) - 5.0)
    return jnp.ones((), float)


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


def init_collapsed(cfg: LocalConfig, thresholds):
    """`ClientState.collapsed` of a new client: no layer collapsed ('previous'), or ()."""
    if cfg.collapse_check != 'previous':
        return ()
    return jax.tree.map(lambda _: jnp.zeros((), bool), thresholds)


def step_thresholds(cfg: LocalConfig, state: ClientState):
    """The thresholds a forward pass uses: collapsed layers reset to 0 (`LocalConfig.collapse_check`)."""
    if cfg.collapse_check == 'previous':
        return masking.reset_flagged(state.collapsed, state.thresholds)
    return masking.reset_collapsed_thresholds(state.params, state.thresholds)


def after_forward(cfg: LocalConfig, params, thresholds):
    """`ClientState.collapsed` after a forward pass with these weights and thresholds."""
    if cfg.collapse_check != 'previous':
        return ()
    return masking.collapsed_layers(params, thresholds)


def loss_fn(
    model: nn.Module, params, thresholds, batch_stats, x, y, penalty_coeff, example_mask=None
):
    """Cross-entropy + penalty_coeff * sum(exp(-tau)); returns (loss, (batch_stats, ce, correct)).

    `example_mask` [batch] marks the real examples of a partial batch: the cross-entropy is their
    mean, as PyTorch's loss over a short last batch (models without BatchNorm only: padded examples
    would enter the batch statistics).
    """
    variables = {'params': params, 'thresholds': thresholds, 'batch_stats': batch_stats}
    logits, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    hits = jnp.argmax(logits, -1) == y
    if example_mask is None:
        ce, correct = per_example.mean(), jnp.sum(hits)
    else:
        weight = example_mask.astype(per_example.dtype)
        ce = jnp.sum(per_example * weight) / jnp.maximum(jnp.sum(weight), 1.0)
        correct = jnp.sum(hits & example_mask)
    loss = ce + penalty_coeff * threshold_penalty(thresholds)
    return loss, (updated.get('batch_stats', batch_stats), ce, correct)


def training_flops(params, thresholds, macs, batch_size) -> jax.Array:
    """FLOPs of one step as the paper counts them: 3 x sum(MACs x kept fraction) per example."""
    densities = masking.layer_densities(params, thresholds)
    per_example = sum(jax.tree.leaves(jax.tree.map(lambda m, d: m * d, macs, densities)))
    return 3.0 * batch_size * per_example


def local_step(
    model: nn.Module,
    cfg: LocalConfig,
    state: ClientState,
    opt_state,
    x,
    y,
    valid,
    *,
    lr,
    penalty_coeff,
    macs=None,
    example_mask=None,
):
    """One SGD step. A step with `valid` False returns its inputs unchanged (padding of short clients);
    `example_mask` [batch] marks the real examples of a partial last batch (`loss_fn`)."""
    used = step_thresholds(cfg, state)
    grad_fn = jax.value_and_grad(loss_fn, argnums=(1, 2), has_aux=True)
    (loss, (batch_stats, ce, correct)), grads = grad_fn(
        model, state.params, used, state.batch_stats, x, y, penalty_coeff, example_mask
    )
    tx = make_optimizer(cfg)
    updates, new_opt_state = tx.update(grads, opt_state)
    params, thresholds = jax.tree.map(lambda p, u: p - lr * u, (state.params, used), updates)
    new_state = state.replace(
        params=params,
        thresholds=thresholds,
        batch_stats=batch_stats,
        collapsed=after_forward(cfg, state.params, used),
    )
    keep = lambda new, old: jnp.where(valid, new, old)
    new_state = jax.tree.map(keep, new_state, state)
    new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    examples = (
        jnp.float32(x.shape[0])
        if example_mask is None
        else jnp.sum(example_mask.astype(jnp.float32))
    )
    flops = jnp.float32(0.0)
    if macs is not None:  # the masks this step's forward pass used
        flops = training_flops(state.params, used, macs, examples)
    v = valid.astype(jnp.float32)
    metrics = {
        'loss': ce * v,
        'correct': correct * v,
        'steps': v,
        'flops': flops * v,
        'examples': examples * v,
    }
    return new_state, new_opt_state, metrics


def batch_schedule(
    rng, count, max_count: int, *, batch_size: int, epochs: int, drop_last: bool = True
):
    """Shuffled batches of a client's own examples, padded to a shape every client shares.

    Returns positions [epochs * stride, batch_size] into the client's example list and a validity
    flag per step, with stride = `steps_per_epoch(max_count)`: a client with `count` examples has
    `steps_per_epoch(count)` real steps per epoch, the rest are padding. Positions >= count are
    padding inside a step (only the last partial batch has them, when not `drop_last`); read them
    through `example_ids_of`, which clamps them into the table, and mask them out (`example_mask`).
    """
    cfg = LocalConfig(batch_size=batch_size, drop_last=drop_last)
    steps = steps_per_epoch(cfg, max_count)
    width = max(max_count, steps * batch_size)  # > max_count only for a partial last batch
    position = jnp.arange(width)

    def one_epoch(key):
        keys = jnp.pad(
            jax.random.uniform(key, (max_count,)), (0, width - max_count), constant_values=2.0
        )
        order = jnp.argsort(jnp.where(position < count, keys, 2.0))
        return order[: steps * batch_size].reshape(steps, batch_size)

    batches = jax.vmap(one_epoch)(jax.random.split(rng, epochs)).reshape(epochs * steps, batch_size)
    valid = jnp.tile(jnp.arange(steps) < steps_per_epoch(cfg, count), epochs)
    return batches, valid


def local_schedule(cfg: LocalConfig, rng, count, max_count: int):
    """A client's whole round of randomness from its key: batches, their validity, augment keys.

    Every execution strategy draws through this one function, so batches and augmentation depend on
    (seed, round, client id) and the padded table width only, never on how the steps are run.
    Returns positions [steps, batch_size], valid [steps] and keys [steps] with
    steps = local_epochs * stride, stride = `steps_per_epoch(cfg, max_count)`; step e * stride + s
    is the s-th batch of epoch e. A position >= count marks a padded example (`example_mask`).
    """
    schedule_rng, augment_rng = jax.random.split(rng)
    batches, valid = batch_schedule(
        schedule_rng,
        count,
        max_count,
        batch_size=cfg.batch_size,
        epochs=cfg.local_epochs,
        drop_last=cfg.drop_last,
    )
    return batches, valid, jax.random.split(augment_rng, valid.shape[0])


def example_ids_of(example_ids, positions):
    """The dataset indices at `positions` of a client's (padded) example list; positions past its
    end (padding of a partial batch) read its last entry."""
    return example_ids[jnp.minimum(positions, example_ids.shape[-1] - 1)]


def example_mask(cfg: LocalConfig, positions, count):
    """[batch] real examples of a step of `local_schedule`, or None when every batch is full."""
    return None if cfg.drop_last else positions < count


def round_opt_state(cfg: LocalConfig, state: ClientState):
    """The optimizer state a client starts its local work with: kept, or fresh (zero momentum)."""
    if cfg.persistent_optimizer:
        return state.opt_state
    return make_optimizer(cfg).init((state.params, state.thresholds))


def over_real_steps(cfg: LocalConfig, body, carry, count, max_count: int, unroll: int = 1):
    """Runs `carry, metrics = body(carry, index)` for a client's real local steps only, in order:
    the one local-step loop of every round (`algorithm.local_work`, `execution.RoundRunner`'s
    'map', `local_update`).

    `index` is the step's row in `local_schedule`: the s-th real step of epoch e is row
    e * steps_per_epoch(cfg, max_count) + s. The loop's trip count is the client's own number of real
    steps, so a small client does not pay for the largest one's padding (under `vmap` the lanes run
    to the longest lane, and the extra iterations are discarded). `unroll` steps run per iteration
    of the compiled loop (`config.scan_unroll`). Returns (carry, metrics summed over the steps).
    """
    return real_steps(
        cfg, body, carry, steps_per_epoch(cfg, count), steps_per_epoch(cfg, max_count), unroll
    )


def real_steps(cfg: LocalConfig, body, carry, per_epoch, stride: int, unroll: int = 1):
    """`over_real_steps` given the client's real steps per epoch and the schedule's `stride`."""
    safe_per_epoch = jnp.maximum(per_epoch, 1)
    metrics_shape = jax.eval_shape(lambda c: body(c, jnp.int32(0))[1], carry)
    zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics_shape)
    total = per_epoch * cfg.local_epochs

    def step(t, loop_carry):
        carry, sums = loop_carry
        index = (t // safe_per_epoch) * stride + t % safe_per_epoch
        carry, metrics = body(carry, index)
        return carry, jax.tree.map(jnp.add, sums, metrics)

    if unroll <= 1:
        return jax.lax.fori_loop(0, total, step, (carry, zeros))

    def unrolled(i, loop_carry):
        for j in range(unroll):
            loop_carry = step(i * unroll + j, loop_carry)
        return loop_carry

    loop_carry = jax.lax.fori_loop(0, total // unroll, unrolled, (carry, zeros))
    return jax.lax.fori_loop((total // unroll) * unroll, total, step, loop_carry)


def local_update(
    model: nn.Module,
    cfg: LocalConfig,
    spec: DataSpec,
    state: ClientState,
    images,
    labels,
    example_ids,
    count,
    *,
    rng,
    round_index,
    macs=None,
):
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
        ids = example_ids_of(example_ids, batches[index])
        x = preprocess(spec, images[ids], keys[index])
        client, opt, metrics = local_step(
            model,
            cfg,
            client,
            opt,
            x,
            labels[ids],
            jnp.bool_(True),
            lr=lr,
            penalty_coeff=penalty_coeff,
            macs=macs,
            example_mask=example_mask(cfg, batches[index], count),
        )
        return (client, opt), metrics

    (state, opt_state), metrics = over_real_steps(
        cfg, body, (state, round_opt_state(cfg, state)), count, example_ids.shape[0]
    )
    if cfg.persistent_optimizer:
        state = state.replace(opt_state=opt_state)
    return state, metrics
