"""Local training only: every client trains its own dense model on its own data; nothing is sent.

The lower reference of personalized FL: a client gains nothing from the others. The SpaFL models are
used densely (thresholds fixed at `_common.DENSE_THRESHOLD`, untrained, unpenalized).

Choices (there is no paper to depart from):
  - a client trains only in the rounds it is sampled, `local_epochs` each time, so Local spends the
    same computation per round as the federated methods under the same schedule;
  - clients start from one shared initial model (`client_init='independent'`: each its own), as
    SpaFL's clients do;
  - the optimizer is fresh every round, as in every baseline.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from spafl_jax import algorithm as algorithm_lib
from spafl_jax import federated
from spafl_jax import xla
from spafl_jax.baselines import _common
from spafl_jax.client import ClientState, DataSpec, LocalConfig
from spafl_jax.federated import ClientData, RoundConfig


@dataclasses.dataclass(frozen=True)
class LocalOnlyConfig:
    """Local training has no hyperparameters beyond LocalConfig."""


@flax.struct.dataclass
class LocalState:
    clients: ClientState   # every leaf [num_clients, ...]; thresholds all DENSE_THRESHOLD, opt_state ()
    round: jax.Array       # rounds completed (int32 scalar)


def init_state(model_or_name: nn.Module | str, local_cfg: LocalConfig, rng: jax.Array,
               num_clients: int, image_shape, *, num_classes: int = 10,
               method_cfg: LocalOnlyConfig = LocalOnlyConfig(),
               client_init: str = 'shared') -> LocalState:
    """Dense clients, stacked: one shared initial model, or client k's own from fold_in(rng, k)
    (`federated.client_init_keys`)."""
    del local_cfg, method_cfg
    model = _common.dense_model(_common.resolve_model(model_or_name, num_classes))
    keys = federated.client_init_keys(rng, num_clients, client_init)

    def one(key):
        variables = _common.init_dense_variables(model, key, image_shape)
        return ClientState(params=variables['params'], thresholds=variables['thresholds'],
                           batch_stats=variables['batch_stats'], opt_state=())

    clients = _common.stack([one(keys[k]) for k in range(num_clients)])
    return LocalState(clients=clients, round=jnp.zeros((), jnp.int32))


def run_round(model: nn.Module, local_cfg: LocalConfig, round_cfg: RoundConfig, spec: DataSpec,
              state: LocalState, data: ClientData, sampled: jax.Array, seed_key: jax.Array,
              macs=None, *, method_cfg: LocalOnlyConfig = LocalOnlyConfig()):
    """The `[clients_per_round]` sampled clients train their own models; no aggregation."""
    del method_cfg
    model = _common.dense_model(model)
    r = state.round
    thresholds = _common.take(state.clients.thresholds, 0)
    flops = _common.dense_step_flops(macs, thresholds, local_cfg.batch_size)

    def loss_fn(params, batch_stats, x, y, key):
        del key
        logits, batch_stats = _common.apply_train(model, params, thresholds, batch_stats, x)
        ce, correct = _common.cross_entropy(logits, y)
        return ce, (batch_stats, correct, flops)

    def one(params, batch_stats, ids, count, key):
        return _common.local_sgd(local_cfg, spec, loss_fn, params, batch_stats, data.images,
                                 data.labels, ids, count, key, r)

    mine = _common.take(state.clients, sampled)
    args = (mine.params, mine.batch_stats, data.example_ids[sampled], data.counts[sampled],
            algorithm_lib.client_keys(seed_key, r, sampled))
    params, batch_stats, metrics = _common.map_clients(one, args, round_cfg.client_execution)
    clients = _common.put(state.clients, sampled,
                          mine.replace(params=params, batch_stats=batch_stats))
    new_state = LocalState(clients=clients, round=r + 1)
    return new_state, algorithm_lib.round_metrics(metrics, round_cfg.client_execution)


def make_round_fn(model, local_cfg, round_cfg, spec, macs=None, method_cfg=LocalOnlyConfig()):
    """`run_round` compiled once: (state, data, sampled, seed_key) -> (state, metrics)."""
    return _common.compile_round(run_round, model, local_cfg, round_cfg, spec, macs, method_cfg)


def evaluate(model: nn.Module, spec: DataSpec, state: LocalState, data: ClientData,
             batch_size: int, *, method_cfg: LocalOnlyConfig = LocalOnlyConfig()) -> dict:
    """Every client's own model on its own test split (exactly `federated.evaluate`; density 1)."""
    del method_cfg
    return federated.evaluate(_common.dense_model(model), spec, state.clients, data, batch_size)


def make_eval_fn(model, spec, batch_size, method_cfg=LocalOnlyConfig()):
    return xla.jit(functools.partial(evaluate, model, spec, batch_size=batch_size,
                                     method_cfg=method_cfg), model=model)


def communication_bits(num_clients: int, clients_per_round: int, model_variables: dict, *,
                       method_cfg: LocalOnlyConfig = LocalOnlyConfig()) -> tuple[int, int]:
    """Nothing is communicated: (0, 0)."""
    del num_clients, clients_per_round, model_variables, method_cfg
    return 0, 0
