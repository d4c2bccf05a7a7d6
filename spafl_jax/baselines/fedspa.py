"""FedSpa (Huang et al., 2022): personalized sparse models at a fixed density, with prune-and-regrow.

Every client keeps its own unstructured mask over the masked layers' kernels, with a fixed number of
kept weights per layer (density `density`, spread uniformly or by ERK). A sampled client downloads the
global weights on its mask, trains only the kept weights (masked forward pass, so the others get zero
gradient), uploads its trained sparse weights with a bitmap of its mask, and then updates its mask
for the next round: it prunes the alpha_r fraction of kept weights with the smallest magnitude and
regrows as many where the dense gradient of one batch is largest (or at random), alpha_r the cosine
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
from spafl_jax import xla
from spafl_jax.baselines import _common
from spafl_jax.client import ClientState, DataSpec, LocalConfig
from spafl_jax.federated import ClientData, RoundConfig
from spafl_jax.metrics import BITS_PER_FLOAT

DISTRIBUTIONS = ('uniform', 'erk')
REGROWS = ('gradient', 'random')


@dataclasses.dataclass(frozen=True)
class FedSpaConfig:
    density: float = 0.5           # kept fraction of the masked weights, fixed through training
    distribution: str = 'uniform'  # per-layer densities: 'uniform' or 'erk' (Erdos-Renyi-Kernel)
    prune_rate: float = 0.5        # alpha_0: fraction of kept weights pruned and regrown in round 0
    anneal_rounds: int = 100       # the cosine schedule reaches 0 here and stays there
    regrow: str = 'gradient'       # regrow where |dense gradient| is largest, or 'random'

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
class FedSpaState:
    clients: ClientState   # [num_clients, ...]: personal weights (0 off the mask they were trained
                           # on), thresholds all DENSE_THRESHOLD, own BatchNorm statistics
    masks: Any             # [num_clients, ...] bool, each client's mask for its next round
                           # (shaped like the thresholds, one kernel-shaped leaf per masked layer)
    global_params: Any     # the server's weights
    round: jax.Array       # rounds completed (int32 scalar)


# ----------------------------------------------------------------------------------------------------
# Per-layer densities and kept counts (static, from shapes).

def layer_densities(shapes: list[tuple[int, ...]], density: float, distribution: str) -> list[float]:
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
        rhs = sum(n * density if i not in dense else -n * (1.0 - density)
                  for i, n in enumerate(sizes))
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
    counts = [max(1, min(int(np.prod(s)), int(round(d * np.prod(s)))))
              for s, d in zip(shapes, densities)]
    return jax.tree.unflatten(treedef, counts)


def _rank(scores: jax.Array) -> jax.Array:
    """Position of every entry in ascending order of `scores` (0 = smallest), same shape."""
    flat = scores.reshape(-1)
    return jnp.argsort(jnp.argsort(flat)).reshape(scores.shape)


def random_masks(rng: jax.Array, kernels, counts):
    """Exactly `count` kept entries per layer, uniformly at random."""
    leaves, treedef = jax.tree.flatten(kernels)
    keys = jax.random.split(rng, len(leaves))
    return jax.tree.unflatten(treedef, [
        _rank(jax.random.uniform(k, x.shape)) < c
        for k, x, c in zip(keys, leaves, jax.tree.leaves(counts))])


def prune_regrow(kernels, masks, scores, counts, rate):
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


def _holds(params, thresholds, masks):
    """A params-shaped pytree: the kernel masks on masked kernels, True everywhere else."""
    return masking.replace_kernels(jax.tree.map(lambda x: jnp.ones(x.shape, bool), params), masks)


def _on_mask(params, thresholds, masks):
    kernels = masking.kernels_of(params, thresholds)
    return masking.replace_kernels(params, jax.tree.map(lambda k, m: k * m, kernels, masks))


# ----------------------------------------------------------------------------------------------------

def init_state(model_or_name: nn.Module | str, local_cfg: LocalConfig, rng: jax.Array,
               num_clients: int, image_shape, *, num_classes: int = 10,
               method_cfg: FedSpaConfig = FedSpaConfig()) -> FedSpaState:
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
        client = ClientState(params=_on_mask(params, thresholds, masks), thresholds=thresholds,
                             batch_stats=variables['batch_stats'], opt_state=())
        return client, masks

    clients, masks = _common.stack([one(k) for k in range(num_clients)])
    return FedSpaState(clients=clients, masks=masks, global_params=params,
                       round=jnp.zeros((), jnp.int32))


def run_round(model: nn.Module, local_cfg: LocalConfig, round_cfg: RoundConfig, spec: DataSpec,
              state: FedSpaState, data: ClientData, sampled: jax.Array, seed_key: jax.Array,
              macs=None, *, method_cfg: FedSpaConfig = FedSpaConfig()):
    """One FedSpa round over the `[clients_per_round]` sampled ids."""
    model = _common.dense_model(model)
    r = state.round
    thresholds = _common.take(state.clients.thresholds, 0)
    kernels = masking.kernels_of(state.global_params, thresholds)
    counts = kept_counts(kernels, method_cfg)
    fractions = jax.tree.map(lambda k, c: c / k.size, kernels, counts)
    flops = _common.step_flops(macs, fractions, local_cfg.batch_size)
    regrow_flops = _common.dense_step_flops(macs, thresholds, local_cfg.batch_size)
    rate = cosine_rate(method_cfg, r)

    def one(masks, batch_stats, ids, count, key):
        train_key, regrow_key = jax.random.split(key)

        def loss_fn(params, batch_stats, x, y, key):
            del key
            logits, batch_stats = _common.apply_train(
                model, _on_mask(params, thresholds, masks), thresholds, batch_stats, x)
            ce, correct = _common.cross_entropy(logits, y)
            return ce, (batch_stats, correct, flops)

        params, batch_stats, metrics = _common.local_sgd(
            local_cfg, spec, loss_fn, _on_mask(state.global_params, thresholds, masks), batch_stats,
            data.images, data.labels, ids, count, train_key, r)

        trained = masking.kernels_of(params, thresholds)
        if method_cfg.regrow == 'gradient':
            batches, _ = client_lib.batch_schedule(regrow_key, count, ids.shape[0],
                                                   local_cfg.batch_size, 1)
            batch = ids[batches[0]]
            x = client_lib.preprocess(spec, data.images[batch], None)

            def ce_of(kernels):
                logits, _ = _common.apply_train(model, masking.replace_kernels(params, kernels),
                                                thresholds, batch_stats, x)
                return _common.cross_entropy(logits, data.labels[batch])[0]

            # The gradient with respect to the masked kernels is dense: it scores pruned entries too.
            scores = jax.tree.map(jnp.abs, jax.grad(ce_of)(trained))
            metrics = {**metrics, 'flops': metrics['flops'] + regrow_flops}
        else:
            leaves, treedef = jax.tree.flatten(trained)
            keys = jax.random.split(regrow_key, len(leaves))
            scores = jax.tree.unflatten(treedef, [jax.random.uniform(k, w.shape)
                                                  for k, w in zip(keys, leaves)])
        new_masks = prune_regrow(trained, masks, scores, counts, rate)
        return params, batch_stats, new_masks, metrics

    masks = _common.take(state.masks, sampled)
    mine = _common.take(state.clients, sampled)
    args = (masks, mine.batch_stats, data.example_ids[sampled], data.counts[sampled],
            algorithm_lib.client_keys(seed_key, r, sampled))
    params, batch_stats, new_masks, metrics = _common.map_clients(one, args,
                                                                  round_cfg.client_execution)
    weights = _common.client_weights(round_cfg.aggregation, data, sampled)
    # Averaged over the masks the clients trained with, i.e. the entries they actually uploaded.
    global_params = _common.masked_mean(params, _holds(params, thresholds, masks), weights,
                                        state.global_params)
    clients = _common.put(state.clients, sampled, mine.replace(params=params,
                                                               batch_stats=batch_stats))
    new_state = FedSpaState(clients=clients, masks=_common.put(state.masks, sampled, new_masks),
                            global_params=global_params, round=r + 1)
    return new_state, algorithm_lib.round_metrics(metrics, round_cfg.client_execution)


def make_round_fn(model, local_cfg, round_cfg, spec, macs=None, method_cfg=FedSpaConfig()):
    """`run_round` compiled once: (state, data, sampled, seed_key) -> (state, metrics)."""
    method_cfg.validate()
    return _common.compile_round(run_round, model, local_cfg, round_cfg, spec, macs, method_cfg)


def evaluate(model: nn.Module, spec: DataSpec, state: FedSpaState, data: ClientData,
             batch_size: int, *, method_cfg: FedSpaConfig = FedSpaConfig()) -> dict:
    """Every client's own sparse model on its own test split.

    Returns correct [N], counts [N], layer_density [N, L] (kept-WEIGHT fraction: nonzero weights),
    kept_weights [N].
    """
    del method_cfg
    model = _common.dense_model(model)
    correct = _common.correct_per_client(model, spec, lambda k: _common.take(state.clients, k),
                                         data, batch_size)

    def density(params, thresholds):
        return _common.weight_density(jax.tree.map(lambda k: k != 0,
                                                   masking.kernels_of(params, thresholds)))

    fractions, kept = jax.vmap(density)(state.clients.params, state.clients.thresholds)
    return {'correct': correct, 'counts': data.counts, 'layer_density': fractions,
            'kept_weights': kept}


def make_eval_fn(model, spec, batch_size, method_cfg=FedSpaConfig()):
    return xla.jit(functools.partial(evaluate, model, spec, batch_size=batch_size,
                                     method_cfg=method_cfg), model=model)


def communication_bits(num_clients: int, clients_per_round: int, model_variables: dict, *,
                       method_cfg: FedSpaConfig = FedSpaConfig()) -> tuple[int, int]:
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
