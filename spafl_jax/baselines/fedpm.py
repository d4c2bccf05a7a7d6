"""FedPM (Isik et al., ICLR 2023): clients learn a probability mask over frozen random weights.

Every client shares the same frozen random weights W (one seed). The server holds a Bernoulli
probability theta per masked weight. A sampled client starts from scores s = logit(theta), trains them
with the straight-through estimator through a mask sampled afresh at every step
(m ~ Bernoulli(sigmoid(s)), gradient taken as if m = sigmoid(s)), then samples one binary mask and sends
it (1 bit per masked weight). The server's Bayesian aggregation keeps a Beta(alpha, beta) posterior per
weight: alpha += sum of the received masks, beta += (received - sum), and
theta = (alpha - 1) / (alpha + beta - 2), the posterior mode. It broadcasts theta (32 bits per weight).

Choices and departures from the paper:
  - the posterior restarts from the Beta(prior, prior) prior every `prior_reset_every` rounds (the
    paper resets it periodically because the clients' probabilities drift; the period is a config);
    the default, 1, resets every round, so with prior 1 theta is the mean of this round's masks;
  - scores start from logit(clip(theta, prob_clip, 1 - prob_clip)) so that weights whose theta hit
    exactly 0 or 1 can still move;
  - frozen weights are signed Kaiming constants +-sqrt(2 / fan_in) (Ramanujan et al. 2020, the
    supermask initialization FedPM builds on), or the model's own (`weight_init='model'`); only the
    masked layers' kernels are masked, other parameters stay at their initial values (BatchNorm
    scale 1 / bias 0, i.e. non-affine; but also the unmasked head of resnet18 and the embeddings and
    head of vit, which FedPM proper would mask too: on those models this baseline is handicapped);
  - BatchNorm running statistics are each client's own and never sent;
  - the scores are trained with Adam (learning rate `score_lr`, the runner's clipping and learning
    rate decay), fresh every round; `score_optimizer='sgd'` uses the runner's SGD with momentum;
  - evaluation uses the deterministic mask theta > 0.5 (`eval_mask='threshold'`), or one sampled mask
    drawn from a fixed key (`'sample'`); all clients share the global mask, each is scored on its own
    test split;
  - densities are unstructured (kept-weight fraction per layer), not SpaFL's kept-row fraction;
  - FLOPs count each step's sampled mask: 3 x MACs x kept-weight fraction per example.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spafl_jax import algorithm as algorithm_lib
from spafl_jax import client as client_lib
from spafl_jax import masking
from spafl_jax.baselines import _common
from spafl_jax.client import LocalConfig
from spafl_jax.federated import RoundConfig
from spafl_jax.metrics import BITS_PER_FLOAT

WEIGHT_INITS = ('signed_constant', 'model')
SCORE_OPTIMIZERS = ('adam', 'sgd')
EVAL_MASKS = ('threshold', 'sample')


@dataclasses.dataclass(frozen=True)
class FedPMConfig:
    score_lr: float | None = 0.1  # learning rate of the mask scores; None: LocalConfig.lr
    score_optimizer: str = 'adam'  # 'adam' (the paper) or 'sgd' (the runner's clip + momentum)
    weight_init: str = 'signed_constant'  # frozen weights: 'signed_constant' or 'model'
    prior: float = 1.0  # Beta(prior, prior) prior of every theta
    prior_reset_every: int = 1  # rounds between restarts of the Beta posterior
    prob_clip: float = 0.01  # theta clipped to [c, 1 - c] before logit (scores stay finite)
    eval_mask: str = 'threshold'  # 'threshold' (theta > 0.5) or 'sample' (one fixed draw)

    def validate(self) -> None:
        if self.weight_init not in WEIGHT_INITS:
            raise ValueError(f'weight_init={self.weight_init!r}: use one of {WEIGHT_INITS}.')
        if self.score_optimizer not in SCORE_OPTIMIZERS:
            raise ValueError(
                f'score_optimizer={self.score_optimizer!r}: use one of {SCORE_OPTIMIZERS}.'
            )
        if self.eval_mask not in EVAL_MASKS:
            raise ValueError(f'eval_mask={self.eval_mask!r}: use one of {EVAL_MASKS}.')
        if self.prior_reset_every < 1 or self.prior < 1.0 or not 0.0 < self.prob_clip < 0.5:
            raise ValueError(
                'FedPM needs prior_reset_every >= 1, prior >= 1 (the posterior mode is '
                'defined) and 0 < prob_clip < 0.5.'
            )


@flax.struct.dataclass
class FedPMState:
    weights: Any  # frozen random params shared by all clients
    thresholds: Any  # all DENSE_THRESHOLD: the SpaFL row masks are off
    probabilities: Any  # theta per masked weight (shaped like the thresholds, kernel-shaped leaves)
    alpha: Any  # Beta posterior, shaped like probabilities
    beta: Any
    clients: Any  # [num_clients, ...] each client's own BatchNorm statistics
    round: jax.Array  # rounds completed (int32 scalar)


@flax.struct.dataclass
class ScoreWork:
    """A sampled client's local work: its mask scores, its BatchNorm statistics, and the key of the
    mask it sends."""

    scores: Any
    batch_stats: Any
    upload_key: jax.Array


def _signed_constant(kernel: jax.Array) -> jax.Array:
    fan_in = int(np.prod(kernel.shape[:-1]))
    return jnp.sign(kernel) * jnp.sqrt(2.0 / fan_in)


def init_state(
    model_or_name: nn.Module | str,
    local_cfg: LocalConfig,
    rng: jax.Array,
    *,
    num_clients: int,
    image_shape,
    num_classes: int = 10,
    method_cfg: FedPMConfig = FedPMConfig(),
) -> FedPMState:
    """Frozen weights from `rng` (one seed for everyone), theta = 0.5, the Beta prior."""
    del local_cfg
    method_cfg.validate()
    model = _common.dense_model(_common.resolve_model(model_or_name, num_classes))
    variables = _common.init_dense_variables(model, rng, image_shape)
    params, thresholds = variables['params'], variables['thresholds']
    kernels = masking.kernels_of(params, thresholds)
    if method_cfg.weight_init == 'signed_constant':
        params = masking.replace_kernels(params, jax.tree.map(_signed_constant, kernels))
    # Separate buffers for alpha and beta: the compiled round donates its state.
    full = lambda value: jax.tree.map(lambda k: jnp.full(k.shape, value, jnp.float32), kernels)
    stats = jax.tree.map(
        lambda s: jnp.tile(s, (num_clients,) + (1,) * s.ndim), variables['batch_stats']
    )
    return FedPMState(
        weights=params,
        thresholds=thresholds,
        probabilities=full(0.5),
        alpha=full(method_cfg.prior),
        beta=full(method_cfg.prior),
        clients=stats,
        round=jnp.zeros((), jnp.int32),
    )


def masked_params(weights, thresholds, masks):
    """The frozen weights with each masked kernel multiplied by its (binary or sampled) mask."""
    kernels = masking.kernels_of(weights, thresholds)
    return masking.replace_kernels(weights, jax.tree.map(jnp.multiply, kernels, masks))


def _bernoulli(key: jax.Array, probabilities):
    """One Bernoulli draw per entry of a pytree of probabilities (bool, same shapes).

    A single uniform draw split into the leaves: one random-number call site instead of one per
    layer keeps the compiled round small.
    """
    leaves, treedef = jax.tree.flatten(probabilities)
    sizes = [p.size for p in leaves]
    u = jax.random.uniform(key, (sum(sizes),))
    parts = jnp.split(u, np.cumsum(sizes)[:-1])
    return jax.tree.unflatten(
        treedef, [part.reshape(p.shape) < p for part, p in zip(parts, leaves)]
    )


def score_optimizer(cfg: LocalConfig, method_cfg: FedPMConfig) -> optax.GradientTransformation:
    """The scores' optimizer before the -lr scaling (so the runner's learning-rate decay holds)."""
    if method_cfg.score_optimizer == 'adam':
        clip = optax.clip_by_global_norm(cfg.clip) if cfg.clip > 0 else optax.identity()
        return optax.chain(clip, optax.scale_by_adam())
    return client_lib.make_optimizer(cfg)


# ----------------------------------------------------------------------------------------------------
# One round, as the functions of `algorithm.Algorithm` (the settings they need come first, bound by
# `algorithm`; `cfg` is the local configuration with the scores' learning rate).


def round_constants(cfg: LocalConfig, state):
    return client_lib.learning_rate(cfg, state.round), state.weights, state.thresholds


def client_start(tx, method_cfg: FedPMConfig, state, batch_stats, key):
    """The client's scores start at logit(theta), theta clipped to [c, 1 - c]."""
    c = method_cfg.prob_clip
    scores = jax.tree.map(
        lambda p: jax.scipy.special.logit(jnp.clip(p, c, 1.0 - c)), state.probabilities
    )
    work = ScoreWork(scores=scores, batch_stats=batch_stats, upload_key=jax.random.fold_in(key, 1))
    return work, tx.init(scores)


def client_step(
    model, tx, cfg: LocalConfig, macs, work, opt_state, x, y, example_mask, constants, key
):
    """One step on the scores, through a sampled mask of the frozen weights."""
    del example_mask  # full batches only
    lr, weights, thresholds = constants
    draw_key = jax.random.fold_in(key, 1)  # `key` drew the step's augmentation

    def loss_fn(scores):
        theta = jax.tree.map(jax.nn.sigmoid, scores)
        draws = jax.tree.map(lambda d: d.astype(jnp.float32), _bernoulli(draw_key, theta))
        # Straight-through: the forward pass sees the binary draw, the backward sigmoid(s).
        masks = jax.tree.map(lambda m, t: m + t - jax.lax.stop_gradient(t), draws, theta)
        params = masked_params(weights, thresholds, masks)
        logits, batch_stats = _common.apply_train(model, params, thresholds, work.batch_stats, x)
        ce, correct = _common.cross_entropy(logits, y)
        return ce, (batch_stats, correct, jax.tree.map(jnp.mean, draws))

    (loss, (batch_stats, correct, kept)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        work.scores
    )
    updates, opt_state = tx.update(grads, opt_state)
    scores = jax.tree.map(lambda p, u: p - lr * u, work.scores, updates)
    metrics = {
        'loss': loss,
        'correct': correct.astype(jnp.float32),
        'steps': jnp.float32(1.0),
        'flops': _common.step_flops(macs, kept, cfg.batch_size),
        'examples': jnp.float32(cfg.batch_size),
    }
    return work.replace(scores=scores, batch_stats=batch_stats), opt_state, metrics


def client_end(work, opt_state):
    """The client uploads one binary mask drawn from its final theta."""
    del opt_state
    upload = _bernoulli(work.upload_key, jax.tree.map(jax.nn.sigmoid, work.scores))
    return work.batch_stats, jax.tree.map(lambda u: u.astype(jnp.float32), upload)


def server_update(method_cfg: FedPMConfig, received, state, mean_upload, clients):
    """Bayesian aggregation: the `received` masks are Bernoulli observations of theta."""
    reset = (state.round % method_cfg.prior_reset_every) == 0
    ones = jax.tree.map(lambda m: m * received, mean_upload)
    restart = lambda a: jnp.where(reset, method_cfg.prior, a)
    alpha = jax.tree.map(lambda a, s: restart(a) + s, state.alpha, ones)
    beta = jax.tree.map(lambda b, s: restart(b) + received - s, state.beta, ones)
    theta = jax.tree.map(lambda a, b: (a - 1.0) / (a + b - 2.0), alpha, beta)
    return state.replace(
        probabilities=theta, alpha=alpha, beta=beta, clients=clients, round=state.round + 1
    )


def eval_variables(method_cfg: FedPMConfig, state, batch_stats, count):
    del count
    masks = jax.tree.map(lambda m: m.astype(jnp.float32), eval_masks(state, method_cfg))
    variables = {
        'params': masked_params(state.weights, state.thresholds, masks),
        'thresholds': state.thresholds,
        'batch_stats': batch_stats,
    }
    return variables, variables


def eval_density(method_cfg: FedPMConfig, state, clients, counts):
    # Unstructured: the kept-weight fraction of the global mask, the same for every client.
    del clients
    fractions, kept = _common.weight_density(eval_masks(state, method_cfg))
    n = counts.shape[0]
    return {
        'layer_density': jnp.broadcast_to(fractions, (n, fractions.shape[0])),
        'kept_weights': jnp.broadcast_to(kept, (n,)),
    }


def algorithm(
    model: nn.Module,
    local_cfg: LocalConfig,
    round_cfg: RoundConfig = RoundConfig(),
    macs=None,
    *,
    method_cfg: FedPMConfig = FedPMConfig(),
) -> algorithm_lib.Algorithm:
    """FedPM as an `algorithm.Algorithm`. The Bayesian aggregation counts every received mask once,
    so the mean is unweighted whatever `round_cfg.aggregation` says."""
    method_cfg.validate()
    _common.check_full_batches(local_cfg)
    model = _common.dense_model(model)
    cfg = local_cfg
    if method_cfg.score_lr is not None:
        cfg = dataclasses.replace(local_cfg, lr=method_cfg.score_lr)
    tx = score_optimizer(cfg, method_cfg)
    received = jnp.float32(round_cfg.clients_per_round)
    return algorithm_lib.Algorithm(
        name='fedpm',
        model=model,
        state_type=FedPMState,
        round_constants=functools.partial(round_constants, cfg),
        client_start=functools.partial(client_start, tx, method_cfg),
        client_step=functools.partial(client_step, model, tx, cfg, macs),
        client_end=client_end,
        server_update=functools.partial(server_update, method_cfg, received),
        eval_variables=functools.partial(eval_variables, method_cfg),
        eval_density=functools.partial(eval_density, method_cfg),
        aggregation='uniform',
    )


def eval_masks(state: FedPMState, method_cfg: FedPMConfig = FedPMConfig()):
    """The binary mask every client deploys: theta > 0.5, or one draw from a fixed key."""
    if method_cfg.eval_mask == 'threshold':
        return jax.tree.map(lambda p: p > 0.5, state.probabilities)
    return _bernoulli(jax.random.key(0), state.probabilities)


def communication_bits(
    num_clients: int,
    clients_per_round: int,
    model_variables: dict,
    *,
    method_cfg: FedPMConfig = FedPMConfig(),
) -> tuple[int, int]:
    """(bits up, bits down) per round: 1 bit per masked weight up, a 32-bit theta per weight down,
    for each sampled client. Nothing else is sent (frozen weights come from a shared seed)."""
    del num_clients, method_cfg
    n = _common.num_masked_weights(model_variables)
    return clients_per_round * n, clients_per_round * n * BITS_PER_FLOAT
