"""FedAvg (McMahan et al., AISTATS 2017): one dense global model, averaged after local training.

The SpaFL models are used densely: every threshold sits at `_common.DENSE_THRESHOLD`, so every row is
kept, and thresholds are neither trained nor penalized nor communicated. Each round the sampled
clients start from the global weights (and BatchNorm statistics), train locally, and the server
averages what they send back. Accuracy is the global model's accuracy on each client's own test split.

Departures from the paper:
  - the average is unweighted unless `RoundConfig.aggregation == 'data_size'` (the paper weights by
    n_k); the default matches the SpaFL runner so both methods see the same aggregation rule;
  - BatchNorm running statistics are averaged along with the weights (the paper's models have no
    BatchNorm) and are counted in the communication;
  - the local optimizer (SGD with momentum, clipping) is the SpaFL runner's, fresh every round.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from spafl_jax import algorithm as algorithm_lib
from spafl_jax import xla
from spafl_jax.baselines import _common
from spafl_jax.client import ClientState, DataSpec, LocalConfig
from spafl_jax.federated import ClientData, RoundConfig
from spafl_jax.metrics import BITS_PER_FLOAT



@dataclasses.dataclass(frozen=True)
class FedAvgConfig:
    """FedAvg has no hyperparameters beyond LocalConfig and RoundConfig."""


@flax.struct.dataclass
class FedAvgState:
    params: Any        # the global weights (and BatchNorm scale/bias)
    batch_stats: Any   # the global BatchNorm running statistics ({} without BatchNorm)
    thresholds: Any    # all DENSE_THRESHOLD: fixed, never trained, never sent
    round: jax.Array   # rounds completed (int32 scalar)


def init_state(model_or_name: nn.Module | str, local_cfg: LocalConfig, rng: jax.Array,
               num_clients: int, image_shape, *, num_classes: int = 10,
               method_cfg: FedAvgConfig = FedAvgConfig()) -> FedAvgState:
    """A fresh global model from `rng` (num_clients is unused: clients keep nothing between rounds)."""
    del local_cfg, num_clients, method_cfg
    model = _common.dense_model(_common.resolve_model(model_or_name, num_classes))
    variables = _common.init_dense_variables(model, rng, image_shape)
    return FedAvgState(params=variables['params'], batch_stats=variables['batch_stats'],
                       thresholds=variables['thresholds'], round=jnp.zeros((), jnp.int32))


def run_round(model: nn.Module, local_cfg: LocalConfig, round_cfg: RoundConfig, spec: DataSpec,
              state: FedAvgState, data: ClientData, sampled: jax.Array, seed_key: jax.Array,
              macs=None, *, method_cfg: FedAvgConfig = FedAvgConfig()):
    """One FedAvg round: broadcast, local training of the `[clients_per_round]` sampled ids, average."""
    del method_cfg
    model = _common.dense_model(model)
    r = state.round
    flops = _common.dense_step_flops(macs, state.thresholds, local_cfg.batch_size)

    def loss_fn(params, batch_stats, x, y, key):
        del key
        logits, batch_stats = _common.apply_train(model, params, state.thresholds, batch_stats, x)
        ce, correct = _common.cross_entropy(logits, y)
        return ce, (batch_stats, correct, flops)

    def one(ids, count, key):
        return _common.local_sgd(local_cfg, spec, loss_fn, state.params, state.batch_stats,
                                 data.images, data.labels, ids, count, key, r)

    args = (data.example_ids[sampled], data.counts[sampled],
            algorithm_lib.client_keys(seed_key, r, sampled))
    params, batch_stats, metrics = _common.map_clients(one, args, round_cfg.client_execution)
    weights = _common.client_weights(round_cfg.aggregation, data, sampled)
    new_state = FedAvgState(
        params=_common.masked_mean(params, None, weights, state.params),
        batch_stats=_common.masked_mean(batch_stats, None, weights, state.batch_stats),
        thresholds=state.thresholds, round=r + 1)
    return new_state, algorithm_lib.round_metrics(metrics, round_cfg.client_execution)


def make_round_fn(model, local_cfg, round_cfg, spec, macs=None, method_cfg=FedAvgConfig()):
    """`run_round` compiled once: (state, data, sampled, seed_key) -> (state, metrics)."""
    return _common.compile_round(run_round, model, local_cfg, round_cfg, spec, macs, method_cfg)


def evaluate(model: nn.Module, spec: DataSpec, state: FedAvgState, data: ClientData,
             batch_size: int, *, method_cfg: FedAvgConfig = FedAvgConfig()) -> dict:
    """The global model on every client's own test split; density 1 everywhere.

    Returns correct [N], counts [N], layer_density [N, L] (all 1), kept_weights [N] (all masked weights).
    """
    del method_cfg
    model = _common.dense_model(model)
    global_model = ClientState(params=state.params, thresholds=state.thresholds,
                               batch_stats=state.batch_stats, opt_state=())
    correct = _common.correct_per_client(model, spec, lambda k: global_model, data, batch_size)
    return {'correct': correct, 'counts': data.counts,
            **_common.dense_density(state.thresholds, state.params, data.counts.shape[0])}


def make_eval_fn(model, spec, batch_size, method_cfg=FedAvgConfig()):
    return xla.jit(functools.partial(evaluate, model, spec, batch_size=batch_size,
                                     method_cfg=method_cfg), model=model)


def communication_bits(num_clients: int, clients_per_round: int, model_variables: dict, *,
                       method_cfg: FedAvgConfig = FedAvgConfig()) -> tuple[int, int]:
    """(bits up, bits down) per round: every weight and running statistic, 32 bits, each sampled client.

    `model_variables` is one model's variables (`models.init_variables`); thresholds are not sent.
    """
    del num_clients, method_cfg
    n = _common.num_entries(model_variables['params']) + _common.num_entries(
        model_variables.get('batch_stats', {}))
    bits = clients_per_round * n * BITS_PER_FLOAT
    return bits, bits
