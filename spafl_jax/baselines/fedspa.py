"""FedSpa (Huang et al., 2022): personalized sparse models at a fixed density, with prune-and-regrow.

Every client keeps its own unstructured mask over the masked layers' kernels, with a fixed number of
kept weights per layer (density `density`, spread uniformly or by ERK). A sampled client downloads the
global weights on its mask, trains only the kept weights (masked forward pass, so the others get zero
gradient), uploads its trained sparse weights with a bitmap of its mask, and then updates its mask
for the next round: it prunes the alpha_r fraction of kept weights with the smallest magnitude and
regrows as many where the dense gradient of one batch is largest (or at random; `client_final`,
on a batch of its own data drawn for it), alpha_r the cosine
schedule alpha_0 / 2 x (1 + cos(pi r / anneal_rounds)), 0 after `anneal_rounds`. The server averages
every entry over the sampled clients whose mask holds it (entries nobody holds keep their value).
Other parameters (BatchNorm scale/bias) are dense and averaged like FedAvg's.

Choices and departures from the paper:
  - the mask is updated after the upload, so the server averages what each client actually trained
    (regrown weights start at the global value at the next download, not at 0);
  - server averaging is over the holders of each entry (the brief of this project), not a plain mean
    that would count the zeros of clients that do not hold it;
  - BatchNorm running statistics are each client's own and never sent;
  - initial masks are random per client (seeded by fold_in(rng, k)); the initial global weights are
    shared;
  - uplink: 32 bits per kept weight + a 1-bit-per-weight bitmap of the mask + 32 bits per unmasked
    parameter; downlink: 32 bits per kept weight + 32 per unmasked parameter (the server knows the
    mask from the bitmap);
  - FLOPs: training steps at the layers' fixed densities, plus one dense step per sampled client for
    the regrow gradient; layer_density is the kept-weight fraction (unstructured).
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

from spafl_jax import algorithm as algorithm_lib
from spafl_jax import client as client_lib
from spafl_jax import masking
from spafl_jax.baselines import _common
from spafl_jax.client import LocalConfig
from spafl_jax.federated import RoundConfig
from spafl_jax.metrics import BITS_PER_FLOAT

DISTRIBUTIONS = ('uniform', 'erk')
REGROWS = ('gradient', 'random')


@dataclasses.dataclass(frozen=True)
class FedSpaConfig:
    density: float = 0.5  # kept fraction of the masked weights, fixed through training
    distribution: str = 'uniform'  # per-layer densities: 'uniform' or 'erk' (Erdos-Renyi-Kernel)
    prune_rate: float = 0.5  # alpha_0: fraction of kept weights pruned and regrown in round 0
    anneal_rounds: int = 100  # the cosine schedule reaches 0 here and stays there
    regrow: str = 'gradient'  # regrow where |dense gradient| is largest, or 'random'

    def validate(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f'density={self.density}: must be in (0, 1].')
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f'distribution={self.distribution!r}: use one of {DISTRIBUTIONS}.')
        if self.regrow not in REGROWS:
            raise ValueError(f'regrow={self.regrow!r}: use one of {REGROWS}.')
        if not 0.0 <= self.prune_rate <= 1.0 or self.anneal_rounds < 1:
            raise ValueError('FedSpa needs 0 <= prune_rate <= 1 and anneal_rounds >= 1.')


@flax.struct.dataclass
class FedSpaClient:
    """What a FedSpa client keeps between rounds."""

    params: Any  # its personal weights: 0 off the mask they were trained on
    batch_stats: Any  # its own BatchNorm statistics (never sent)
    masks: Any  # bool, its mask for the next round (one kernel-shaped leaf per masked layer)


@flax.struct.dataclass
class FedSpaState:
    clients: FedSpaClient  # [num_clients, ...]
    global_params: Any  # the server's weights
    thresholds: Any  # all DENSE_THRESHOLD: the SpaFL models used densely (never trained)
    round: jax.Array  # rounds completed (int32 scalar)


@flax.struct.dataclass
class FedSpaWork:
    """A sampled client during its round."""

    params: Any  # the global weights on its mask, then trained
    batch_stats: Any
    masks: Any  # the mask it trains with (and uploads)
    next_masks: Any  # after `client_final`: its mask for the next round


# ----------------------------------------------------------------------------------------------------
# Per-layer densities and kept counts (static, from shapes).


def layer_densities(
    shapes: list[tuple[int, ...]], density: float, distribution: str
) -> list[float]:
    """Density of each layer: the same everywhere, or ERK (RigL, Evci et al. 2020).

    ERK makes a layer's density proportional to sum(shape) / prod(shape), scaled so the kept weights
    total `density` of all weights; layers that would exceed 1 are made dense and the rest rescaled.
    """
    if distribution == 'uniform':
        return [density] * len(shapes)
    sizes = [float(np.prod(s)) for s in shapes]
    raw = [float(np.sum(s)) / n for s, n in zip(shapes, sizes)]
    dense: set[int] = set()
    while True:
        rhs = sum(
            n * density if i not in dense else -n * (1.0 - density) for i, n in enumerate(sizes)
        )
        divisor = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        eps = rhs / divisor
        sparse_raw = [raw[i] for i in range(len(sizes)) if i not in dense]
        if max(sparse_raw) * eps <= 1.0:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(sizes))]
        dense |= {i for i in range(len(sizes)) if i not in dense and raw[i] == max(sparse_raw)}


def kept_counts(kernels, method_cfg: FedSpaConfig):
    """Kept weights per masked layer (a pytree of Python ints shaped like `kernels`)."""
    leaves, treedef = jax.tree.flatten(kernels)
    shapes = [tuple(np.shape(k)) for k in leaves]
    densities = layer_densities(shapes, method_cfg.density, method_cfg.distribution)
    counts = [
        max(1, min(int(np.prod(s)), int(round(d * np.prod(s))))) for s, d in zip(shapes, densities)
    ]
    return jax.tree.unflatten(treedef, counts)


def _rank(scores: jax.Array) -> jax.Array:
    """Position of every entry in ascending order of `scores` (0 = smallest), same shape."""
    flat = scores.reshape(-1)
    return jnp.argsort(jnp.argsort(flat)).reshape(scores.shape)


def random_masks(rng: jax.Array, kernels, counts):
    """Exactly `count` kept entries per layer, uniformly at random."""
    leaves, treedef = jax.tree.flatten(kernels)
    keys = jax.random.split(rng, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            _rank(jax.random.uniform(k, x.shape)) < c
            for k, x, c in zip(keys, leaves, jax.tree.leaves(counts))
        ],
    )


def prune_regrow(kernels, masks, scores, *, counts, rate):
    """Drops floor(rate x count) kept weights of smallest |w| per layer, regrows as many with the
    largest `scores` among the entries not kept; every layer keeps exactly `count` entries."""

    def one(w, m, s, count):
        n = jnp.floor(rate * count).astype(jnp.int32)
        pruned = m & (_rank(jnp.where(m, jnp.abs(w), jnp.inf)) < n)
        kept = m & ~pruned
        grown = ~kept & (_rank(-jnp.where(kept, -jnp.inf, s)) < n)
        return kept | grown

    return jax.tree.map(one, kernels, masks, scores, counts)


def cosine_rate(method_cfg: FedSpaConfig, round_index) -> jax.Array:
    r = jnp.minimum(jnp.asarray(round_index, jnp.float32), method_cfg.anneal_rounds)
    return 0.5 * method_cfg.prune_rate * (1.0 + jnp.cos(jnp.pi * r / method_cfg.anneal_rounds))


def _holds(params, masks):
    """A params-shaped pytree: the kernel masks on masked kernels, True everywhere else."""
    return masking.replace_kernels(jax.tree.map(lambda x: jnp.ones(x.shape, bool), params), masks)


def _on_mask(params, thresholds, masks):
    kernels = masking.kernels_of(params, thresholds)
    return masking.replace_kernels(params, jax.tree.map(lambda k, m: k * m, kernels, masks))


# ----------------------------------------------------------------------------------------------------


def init_state(
    model_or_name: nn.Module | str,
    local_cfg: LocalConfig,
    rng: jax.Array,
    *,
    num_clients: int,
    image_shape,
    num_classes: int = 10,
    method_cfg: FedSpaConfig = FedSpaConfig(),
) -> FedSpaState:
    """Shared initial global weights, a random mask per client, client k's weights on its mask."""
    del local_cfg
    method_cfg.validate()
    model = _common.dense_model(_common.resolve_model(model_or_name, num_classes))
    init_rng, mask_rng = jax.random.split(rng)
    variables = _common.init_dense_variables(model, init_rng, image_shape)
    params, thresholds = variables['params'], variables['thresholds']
    kernels = masking.kernels_of(params, thresholds)
    counts = kept_counts(kernels, method_cfg)

    def one(k):
        masks = random_masks(jax.random.fold_in(mask_rng, k), kernels, counts)
        return FedSpaClient(
            params=_on_mask(params, thresholds, masks),
            batch_stats=variables['batch_stats'],
            masks=masks,
        )

    return FedSpaState(
        clients=_common.stack([one(k) for k in range(num_clients)]),
        global_params=params,
        thresholds=thresholds,
        round=jnp.zeros((), jnp.int32),
    )


# ----------------------------------------------------------------------------------------------------
# One round, as the functions of `algorithm.Algorithm` (the settings they need come first, bound by
# `algorithm`).


def _counts_of(method_cfg: FedSpaConfig, params, thresholds):
    return kept_counts(masking.kernels_of(params, thresholds), method_cfg)


def round_constants(local_cfg: LocalConfig, method_cfg: FedSpaConfig, state):
    return (
        client_lib.learning_rate(local_cfg, state.round),
        state.thresholds,
        cosine_rate(method_cfg, state.round),
    )


def client_start(tx, state, stored: FedSpaClient, key):
    """The client downloads the global weights on its mask."""
    del key
    params = _on_mask(state.global_params, state.thresholds, stored.masks)
    work = FedSpaWork(
        params=params,
        batch_stats=stored.batch_stats,
        masks=stored.masks,
        next_masks=stored.masks,
    )
    return work, tx.init(params)


def client_step(
    model,
    tx,
    local_cfg: LocalConfig,
    method_cfg: FedSpaConfig,
    macs,
    work: FedSpaWork,
    opt_state,
    x,
    y,
    example_mask,
    constants,
    key,
):
    """One SGD step on the kept weights."""
    del example_mask, key  # full batches only; nothing drawn
    lr, thresholds, _ = constants
    kernels = masking.kernels_of(work.params, thresholds)
    fractions = jax.tree.map(
        lambda k, c: c / k.size, kernels, _counts_of(method_cfg, work.params, thresholds)
    )
    # The forward pass sees the weights on the mask only: the others get no gradient.
    params, opt_state, batch_stats, loss, correct = _common.sgd_step(
        model,
        tx,
        work.params,
        opt_state,
        thresholds,
        work.batch_stats,
        x,
        y,
        lr,
        forward=lambda p: _on_mask(p, thresholds, work.masks),
    )
    metrics = _common.step_metrics(
        loss,
        correct,
        _common.step_flops(macs, fractions, local_cfg.batch_size),
        local_cfg.batch_size,
    )
    return work.replace(params=params, batch_stats=batch_stats), opt_state, metrics


def client_final(
    model,
    local_cfg: LocalConfig,
    method_cfg: FedSpaConfig,
    macs,
    work: FedSpaWork,
    opt_state,
    x,
    y,
    constants,
    key,
):
    """Prune-and-regrow: the client's mask for the next round, at the round's rate alpha_r."""
    del opt_state
    _, thresholds, rate = constants
    trained = masking.kernels_of(work.params, thresholds)
    flops = jnp.float32(0.0)
    if method_cfg.regrow == 'gradient':

        def ce_of(kernels):
            logits, _ = _common.apply_train(
                model,
                masking.replace_kernels(work.params, kernels),
                thresholds,
                work.batch_stats,
                x,
            )
            return _common.cross_entropy(logits, y)[0]

        # The gradient with respect to the kernels is dense: it scores pruned entries too.
        scores = jax.tree.map(jnp.abs, jax.grad(ce_of)(trained))
        flops = _common.dense_step_flops(macs, thresholds, local_cfg.batch_size)
    else:
        leaves, treedef = jax.tree.flatten(trained)
        keys = jax.random.split(key, len(leaves))
        scores = jax.tree.unflatten(
            treedef, [jax.random.uniform(k, w.shape) for k, w in zip(keys, leaves)]
        )
    next_masks = prune_regrow(
        trained,
        work.masks,
        scores,
        counts=_counts_of(method_cfg, work.params, thresholds),
        rate=rate,
    )
    metrics = {
        'loss': jnp.float32(0.0),
        'correct': jnp.float32(0.0),
        'steps': jnp.float32(0.0),
        'flops': flops,
        'examples': jnp.float32(0.0),
    }
    return work.replace(next_masks=next_masks), metrics


def client_end(work: FedSpaWork, opt_state):
    del opt_state
    stored = FedSpaClient(params=work.params, batch_stats=work.batch_stats, masks=work.next_masks)
    # What the client uploads: its trained weights on the mask it trained with (0 elsewhere:
    # they got no gradient) and that mask. The server's mean per entry is over its holders.
    holds = jax.tree.map(lambda h: h.astype(jnp.float32), _holds(work.params, work.masks))
    return stored, {'weights': work.params, 'holds': holds}


def server_update(state, mean, clients):
    # mean['weights'] / mean['holds'] is the weighted mean over the clients holding each entry;
    # an entry nobody held keeps its value.
    global_params = jax.tree.map(
        lambda w, h, old: jnp.where(h > 0, w / jnp.maximum(h, 1e-30), old),
        mean['weights'],
        mean['holds'],
        state.global_params,
    )
    return state.replace(clients=clients, global_params=global_params, round=state.round + 1)


def eval_variables(state, stored: FedSpaClient, count):
    del count
    variables = {
        'params': stored.params,
        'thresholds': state.thresholds,
        'batch_stats': stored.batch_stats,
    }
    return variables, variables


def eval_density(state, clients: FedSpaClient, counts):
    del counts

    def one(params):
        kernels = masking.kernels_of(params, state.thresholds)
        return _common.weight_density(jax.tree.map(lambda k: k != 0, kernels))

    fractions, kept = jax.vmap(one)(clients.params)
    return {'layer_density': fractions, 'kept_weights': kept}


def algorithm(
    model: nn.Module,
    local_cfg: LocalConfig,
    round_cfg: RoundConfig = RoundConfig(),
    macs=None,
    *,
    method_cfg: FedSpaConfig = FedSpaConfig(),
) -> algorithm_lib.Algorithm:
    """FedSpa as an `algorithm.Algorithm`: sparse training on the client's mask, prune-and-regrow
    in `client_final`, the server's mean over the holders of each entry."""
    del round_cfg
    method_cfg.validate()
    model = _common.dense_model(model)
    _common.check_full_batches(local_cfg)
    tx = client_lib.make_optimizer(local_cfg)
    return algorithm_lib.Algorithm(
        name='fedspa',
        model=model,
        state_type=FedSpaState,
        round_constants=functools.partial(round_constants, local_cfg, method_cfg),
        client_start=functools.partial(client_start, tx),
        client_step=functools.partial(client_step, model, tx, local_cfg, method_cfg, macs),
        client_final=functools.partial(client_final, model, local_cfg, method_cfg, macs),
        client_end=client_end,
        server_update=server_update,
        eval_variables=eval_variables,
        eval_density=eval_density,
    )


def communication_bits(
    num_clients: int,
    clients_per_round: int,
    model_variables: dict,
    *,
    method_cfg: FedSpaConfig = FedSpaConfig(),
) -> tuple[int, int]:
    """(bits up, bits down) per round, for clients_per_round sampled clients:
    up = 32 x kept weights + 1 x masked weights (bitmap) + 32 x unmasked parameters,
    down = 32 x kept weights + 32 x unmasked parameters."""
    del num_clients
    kernels = masking.kernels_of(model_variables['params'], model_variables['thresholds'])
    kept = sum(jax.tree.leaves(kept_counts(kernels, method_cfg)))
    masked = _common.num_entries(kernels)
    unmasked = _common.num_entries(model_variables['params']) - masked
    up = clients_per_round * (BITS_PER_FLOAT * kept + masked + BITS_PER_FLOAT * unmasked)
    down = clients_per_round * (BITS_PER_FLOAT * kept + BITS_PER_FLOAT * unmasked)
    return up, down
