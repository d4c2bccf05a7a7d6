"""One interface over SpaFL and its comparison baselines, so the runner can run any of them.

`get(config.method, config)` returns a `Method`: the method's initial state, its
`algorithm.Algorithm` and its communication count (`federated` for SpaFL, `baselines.<name>`
otherwise), with its settings from `config.baseline` bound in. Nothing here computes a round or a
metric: any backend runs the algorithm.

    method = methods.get('fedspa', config)
    state = method.init_state(model, local_cfg, rng, num_clients=num_clients,
                              image_shape=image_shape, num_classes=num_classes)
    alg = method.algorithm(model, local_cfg, round_cfg, macs)
    round_fn = algorithm.make_round_fn(alg, local_cfg, spec)   # or execution.RoundRunner
    state, metrics = round_fn(state, train_data, sampled, seed_key)
    evaluation = algorithm.make_eval_fn(alg, spec, batch_size=batch_size)(state, test_data)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from spafl_jax import baselines
from spafl_jax import federated
from spafl_jax import metrics as metrics_lib
from spafl_jax.baselines import _common, fedpm, heterofl
from spafl_jax.client import ClientState, LocalConfig

METHODS = ('spafl', 'fedavg', 'local', 'fedpm', 'heterofl', 'fedspa')


@dataclasses.dataclass(frozen=True)
class Method:
    """A federated method as the runner sees it (leading client axis `[N, ...]` where stacked).

    init_state(model, local_cfg, rng, *, num_clients, image_shape, num_classes) -> state
    algorithm(model, local_cfg, round_cfg, macs) -> `algorithm.Algorithm`, which every backend
        drives (`algorithm.run_round`, `execution.RoundRunner`: mesh, lanes, hosts)
    bits_per_round(num_clients, clients_per_round, one_client_variables, importance_update)
        -> (bits up, bits down) of one round; `one_client_variables` is one model's
           {'params', 'thresholds', 'batch_stats'}; importance_update matters to SpaFL only
    client_variables(state) -> (params, thresholds, batch_stats), each `[N, ...]`: the model every
        client evaluates with (jit-compatible)
    communicates_thresholds: whether thresholds travel (SpaFL only)
    """

    name: str
    init_state: Callable
    algorithm: Callable
    bits_per_round: Callable
    client_variables: Callable
    communicates_thresholds: bool


# --------------------------------------------------------------------------------------------------
# Baseline settings: `config.baseline.<method>_<field>` is field <field> of
# `baselines.CONFIGS[method]`, so the settings, their defaults and their checks live in one place:
# the baseline's own dataclass.


# Config fields only SpaFL reads: a baseline's run ignores them (its record may hold any value).
SPAFL_ONLY_FIELDS = (
    'th_coeff',
    'penalty_warmup',
    'estimator',
    'importance_update',
    'persistent_optimizer',
    'lazy_importance',
    'collapse_check',
)


def baseline_fields() -> dict[str, tuple[str, str]]:
    """{config.baseline key: (method, field of its settings dataclass)}, every baseline setting."""
    return {
        f'{name}_{field.name}': (name, field.name)
        for name, cls in baselines.CONFIGS.items()
        for field in dataclasses.fields(cls)
    }


def _setting(value: Any) -> Any:
    # Overrides may arrive as lists; the settings dataclasses are frozen and hold tuples.
    return tuple(value) if isinstance(value, list) else value


def baseline_config(name: str, settings: Mapping[str, Any] | None = None):
    """The settings dataclass of baseline `name` from `config.baseline` (missing keys: defaults).

    Raises ValueError naming the `config.baseline.<key>` that is unknown or has a bad value; each
    value is checked on its own by the baseline's `validate`, so the message names one field.
    """
    baselines.check_baseline(name)
    if isinstance(settings, ml_collections.ConfigDict):
        settings = settings.to_dict()
    settings = dict(settings or {})
    fields = baseline_fields()
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ValueError(
            f'config.baseline.{unknown[0]} is not a baseline setting; known: '
            f'{", ".join(sorted(fields))}.'
        )
    overrides = {}
    for key, (method, field) in fields.items():
        if method != name or key not in settings:
            continue
        value = _setting(settings[key])
        try:
            baselines.make_config(name, **{field: value})
        except (ValueError, TypeError) as e:
            raise ValueError(f'config.baseline.{key}={value!r} is not allowed: {e}') from None
        overrides[field] = value
    try:
        return baselines.make_config(name, **overrides)
    except (ValueError, TypeError) as e:
        raise ValueError(f'config.baseline ({name}_*) is not allowed: {e}') from None


def check_settings(settings: Mapping[str, Any]) -> None:
    """Raises ValueError (naming the field) unless every baseline's settings are valid."""
    for name in baselines.BASELINES:
        baseline_config(name, settings)


# --------------------------------------------------------------------------------------------------
# SpaFL.


def _spafl_init_state(
    model: nn.Module,
    local_cfg: LocalConfig,
    rng: jax.Array,
    *,
    num_clients: int,
    image_shape,
    num_classes: int = 10,
    client_init: str = 'shared',
    lazy_importance: bool = False,
):
    del num_classes  # the model already has its head
    return federated.init_state(
        model,
        local_cfg,
        rng,
        num_clients=num_clients,
        image_shape=image_shape,
        client_init=client_init,
        lazy_importance=lazy_importance,
    )


def _spafl_bits_per_round(
    num_clients: int, clients_per_round: int, one_client_variables: dict, importance_update: str
) -> tuple[int, int]:
    return metrics_lib.spafl_bits_per_round(
        _common.num_entries(one_client_variables['thresholds']),
        num_clients,
        clients_per_round,
        importance_update=importance_update,
    )


def _own_clients(state):
    """SpaFL, Local: every client's own model is in `state.clients` (SpaFL's with the importance
    updates it has pending applied, `federated.materialize`)."""
    clients = state.clients
    if isinstance(clients, ClientState):
        clients = jax.vmap(federated.materialize)(clients)
    return clients.params, clients.thresholds, clients.batch_stats


# --------------------------------------------------------------------------------------------------
# The models each baseline client evaluates with (what its `evaluate` builds), stacked on N.


def _broadcast(tree, num_clients: int):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients, *jnp.shape(x))), tree)


def _client_axis(num_clients: int | None, name: str) -> int:
    if num_clients is None:
        raise ValueError(
            f'{name} shares one global model: get the method with '
            f'methods.get({name!r}, config) so it knows config.num_clients.'
        )
    return num_clients


def _fedavg_client_variables(num_clients: int | None):
    def client_variables(state):
        n = _client_axis(num_clients, 'fedavg')
        return (
            _broadcast(state.params, n),
            _broadcast(state.thresholds, n),
            _broadcast(state.batch_stats, n),
        )

    return client_variables


def _fedpm_client_variables(method_cfg: fedpm.FedPMConfig, num_clients: int | None):
    def client_variables(state):
        # The deployed global mask over the frozen weights; BatchNorm statistics are per client.
        n = _client_axis(num_clients, 'fedpm')
        masks = jax.tree.map(lambda m: m.astype(jnp.float32), fedpm.eval_masks(state, method_cfg))
        params = fedpm.masked_params(state.weights, state.thresholds, masks)
        return _broadcast(params, n), _broadcast(state.thresholds, n), state.clients

    return client_variables


def _fedspa_client_variables(state):
    # Each client's own weights and statistics; the thresholds (all open) are the server's.
    num_clients = jax.tree.leaves(state.clients)[0].shape[0]
    return (
        state.clients.params,
        _broadcast(state.thresholds, num_clients),
        state.clients.batch_stats,
    )


def _heterofl_client_variables(state):
    # Client k holds the global model cut to its width (zeros outside), as heterofl.evaluate uses.
    layout = heterofl.width_layout(state.params, state.thresholds)['params']

    def one(rate):
        masks = heterofl.width_masks(state.params, layout, rate=rate)
        return jax.tree.map(lambda x, m: x * m, state.params, masks)

    num_clients = state.clients.shape[0]
    return (
        jax.vmap(one)(state.clients),
        _broadcast(state.thresholds, num_clients),
        _broadcast(state.batch_stats, num_clients),
    )


# --------------------------------------------------------------------------------------------------

# The methods whose clients each hold a model of their own from the start (the others start every
# client from one global model, so `client_init='independent'` has no meaning for them).
OWN_INITIAL_MODELS = ('spafl', 'local')


def _baseline(name: str, method_cfg, num_clients: int | None, client_init: str) -> Method:
    module = baselines.get(name)

    def init_state(model, local_cfg, rng, *, num_clients, image_shape, num_classes=10):
        extra = {'client_init': client_init} if name in OWN_INITIAL_MODELS else {}
        return module.init_state(
            model,
            local_cfg,
            rng,
            num_clients=num_clients,
            image_shape=image_shape,
            num_classes=num_classes,
            method_cfg=method_cfg,
            **extra,
        )

    def algorithm(model, local_cfg, round_cfg, macs=None):
        return module.algorithm(model, local_cfg, round_cfg, macs, method_cfg=method_cfg)

    def bits_per_round(num_clients, clients_per_round, one_client_variables, importance_update):
        del importance_update  # SpaFL's
        return module.communication_bits(
            num_clients, clients_per_round, one_client_variables, method_cfg=method_cfg
        )

    client_variables = {
        'fedavg': _fedavg_client_variables(num_clients),
        'local': _own_clients,
        'fedpm': _fedpm_client_variables(method_cfg, num_clients),
        'heterofl': _heterofl_client_variables,
        'fedspa': _fedspa_client_variables,
    }[name]
    return Method(
        name=name,
        init_state=init_state,
        algorithm=algorithm,
        bits_per_round=bits_per_round,
        client_variables=client_variables,
        communicates_thresholds=False,
    )


def get(name: str, settings: Any = None) -> Method:
    """The method `name` (one of METHODS), with the baselines' settings of `settings.baseline` if
    given (a run's `configuration.Settings`, or its ConfigDict).

    Without settings the baselines use their defaults, and the `client_variables` of FedAvg and
    FedPM (which broadcast one global model to `config.num_clients`) raise.

    HeteroFL's `bits_per_round` is the expectation over uniform sampling (a float): its sub-models
    differ in size, so the exact count depends on which clients were sampled
    (`heterofl.communication_bits(..., sampled=ids)`).
    """
    if name not in METHODS:
        raise ValueError(f'method={name!r} is not known; allowed values: {", ".join(METHODS)}.')
    client_init = settings.client_init if settings is not None else 'shared'
    if name == 'spafl':
        return Method(
            name='spafl',
            init_state=functools.partial(
                _spafl_init_state,
                client_init=client_init,
                lazy_importance=settings is not None
                and settings.importance_update == 'all_after'
                and settings.lazy_importance,
            ),
            algorithm=federated.algorithm,
            bits_per_round=_spafl_bits_per_round,
            client_variables=_own_clients,
            communicates_thresholds=True,
        )
    baseline = settings.baseline if settings is not None else None
    num_clients = settings.num_clients if settings is not None else None
    return _baseline(name, baseline_config(name, baseline), num_clients, client_init)
