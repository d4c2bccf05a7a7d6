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

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from spafl_jax import algorithm as algorithm_lib
from spafl_jax import federated
from spafl_jax.baselines import _common
from spafl_jax.client import ClientState, LocalConfig
from spafl_jax.federated import RoundConfig


@dataclasses.dataclass(frozen=True)
class LocalOnlyConfig:
    """Local training has no hyperparameters beyond LocalConfig."""


@flax.struct.dataclass
class LocalState:
    clients: (
        ClientState  # every leaf [num_clients, ...]; thresholds all DENSE_THRESHOLD, opt_state ()
    )
    round: jax.Array  # rounds completed (int32 scalar)


def algorithm(
    model: nn.Module,
    local_cfg: LocalConfig,
    round_cfg: RoundConfig = RoundConfig(),
    macs=None,
    *,
    method_cfg: LocalOnlyConfig = LocalOnlyConfig(),
) -> algorithm_lib.Algorithm:
    """Local training as an `algorithm.Algorithm`: a sampled client trains its own model and
    sends nothing; the server only counts the round."""
    del round_cfg, method_cfg
    model = _common.dense_model(model)

    def client_start(state, stored, key):
        del state, key
        return stored, _common.fresh_optimizer(local_cfg, stored.params)

    def client_end(client, opt_state):
        del opt_state
        return client, ()

    def server_update(state, mean, clients):
        del mean  # nothing was sent
        return LocalState(clients=clients, round=state.round + 1)

    def eval_variables(state, client, count):
        del state, count
        variables = _common.variables_of(client)
        return variables, variables

    def eval_density(state, clients, counts):
        del state
        one = algorithm_lib.take(clients, 0)
        return _common.dense_density(one.thresholds, one.params, counts.shape[0])

    return algorithm_lib.Algorithm(
        name='local',
        model=model,
        state_type=LocalState,
        round_constants=_common.learning_rate(local_cfg),
        client_start=client_start,
        client_step=_common.dense_client_step(model, local_cfg, macs),
        client_end=client_end,
        server_update=server_update,
        eval_variables=eval_variables,
        eval_density=eval_density,
    )


def init_state(
    model_or_name: nn.Module | str,
    local_cfg: LocalConfig,
    rng: jax.Array,
    *,
    num_clients: int,
    image_shape,
    num_classes: int = 10,
    method_cfg: LocalOnlyConfig = LocalOnlyConfig(),
    client_init: str = 'shared',
) -> LocalState:
    """Dense clients, stacked: one shared initial model, or client k's own from fold_in(rng, k)
    (`federated.client_init_keys`)."""
    del local_cfg, method_cfg
    model = _common.dense_model(_common.resolve_model(model_or_name, num_classes))
    keys = federated.client_init_keys(rng, num_clients, client_init)

    def one(key):
        variables = _common.init_dense_variables(model, key, image_shape)
        return ClientState(
            params=variables['params'],
            thresholds=variables['thresholds'],
            batch_stats=variables['batch_stats'],
            opt_state=(),
        )

    clients = _common.stack([one(keys[k]) for k in range(num_clients)])
    return LocalState(clients=clients, round=jnp.zeros((), jnp.int32))


def communication_bits(
    num_clients: int,
    clients_per_round: int,
    model_variables: dict,
    *,
    method_cfg: LocalOnlyConfig = LocalOnlyConfig(),
) -> tuple[int, int]:
    """Nothing is communicated: (0, 0)."""
    del num_clients, clients_per_round, model_variables, method_cfg
    return 0, 0
