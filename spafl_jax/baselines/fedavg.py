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
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from spafl_jax import algorithm as algorithm_lib
from spafl_jax.baselines import _common
from spafl_jax.client import ClientState, LocalConfig
from spafl_jax.federated import RoundConfig
from spafl_jax.metrics import BITS_PER_FLOAT


@dataclasses.dataclass(frozen=True)
class FedAvgConfig:
    """FedAvg has no hyperparameters beyond LocalConfig and RoundConfig."""


@flax.struct.dataclass
class FedAvgState:
    params: Any  # the global weights (and BatchNorm scale/bias)
    batch_stats: Any  # the global BatchNorm running statistics ({} without BatchNorm)
    thresholds: Any  # all DENSE_THRESHOLD: fixed, never trained, never sent
    round: jax.Array  # rounds completed (int32 scalar)
    clients: Any = ()  # clients keep nothing between rounds


def algorithm(
    model: nn.Module,
    local_cfg: LocalConfig,
    round_cfg: RoundConfig = RoundConfig(),
    macs=None,
    *,
    method_cfg: FedAvgConfig = FedAvgConfig(),
) -> algorithm_lib.Algorithm:
    """FedAvg as an `algorithm.Algorithm`: each sampled client trains a copy of the global model
    and sends it back; the server's model becomes their (weighted) mean."""
    del round_cfg, method_cfg
    model = _common.dense_model(model)

    def global_model(state) -> ClientState:
        return ClientState(
            params=state.params,
            thresholds=state.thresholds,
            batch_stats=state.batch_stats,
            opt_state=(),
        )

    def client_start(state, stored, key):
        del stored, key  # clients keep nothing; nothing drawn
        client = global_model(state)
        return client, _common.fresh_optimizer(local_cfg, client.params)

    def client_end(client, opt_state):
        del opt_state
        return (), (client.params, client.batch_stats)

    def server_update(state, mean, clients):
        del clients
        params, batch_stats = mean
        return state.replace(params=params, batch_stats=batch_stats, round=state.round + 1)

    def eval_variables(state, stored, count):
        del stored, count
        variables = _common.variables_of(global_model(state))
        return variables, variables

    return algorithm_lib.Algorithm(
        name='fedavg',
        model=model,
        state_type=FedAvgState,
        round_constants=_common.learning_rate(local_cfg),
        client_start=client_start,
        client_step=_common.dense_client_step(model, local_cfg, macs),
        client_end=client_end,
        server_update=server_update,
        eval_variables=eval_variables,
        eval_density=lambda state, clients, counts: _common.dense_density(
            state.thresholds, state.params, counts.shape[0]
        ),
    )


def init_state(
    model_or_name: nn.Module | str,
    local_cfg: LocalConfig,
    rng: jax.Array,
    *,
    num_clients: int,
    image_shape,
    num_classes: int = 10,
    method_cfg: FedAvgConfig = FedAvgConfig(),
) -> FedAvgState:
    """A fresh global model from `rng` (num_clients is unused: clients keep nothing between rounds)."""
    del local_cfg, num_clients, method_cfg
    model = _common.dense_model(_common.resolve_model(model_or_name, num_classes))
    variables = _common.init_dense_variables(model, rng, image_shape)
    return FedAvgState(
        params=variables['params'],
        batch_stats=variables['batch_stats'],
        thresholds=variables['thresholds'],
        round=jnp.zeros((), jnp.int32),
    )


def communication_bits(
    num_clients: int,
    clients_per_round: int,
    model_variables: dict,
    *,
    method_cfg: FedAvgConfig = FedAvgConfig(),
) -> tuple[int, int]:
    """(bits up, bits down) per round: every weight and running statistic, 32 bits, each sampled client.

    `model_variables` is one model's variables (`models.init_variables`); thresholds are not sent.
    """
    del num_clients, method_cfg
    n = _common.num_entries(model_variables['params']) + _common.num_entries(
        model_variables.get('batch_stats', {})
    )
    bits = clients_per_round * n * BITS_PER_FLOAT
    return bits, bits
