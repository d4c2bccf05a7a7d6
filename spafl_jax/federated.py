"""SpaFL as an `algorithm.Algorithm` (`algorithm`: the client's start, step and end, the server's
update with the importance update, resident or lazy, and the evaluation), its state, and its
reference round: `run_round` is `algorithm.run_round` of it on one device, the one to read and the
one the tests hold `execution.RoundRunner` to (BENCHMARKS.md). Every client's state is stacked on
a leading client axis `[clients, ...]`.
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
from spafl_jax import checks
from spafl_jax import client as client_lib
from spafl_jax import masking
from spafl_jax import models
from spafl_jax import server
from spafl_jax.client import ClientState, DataSpec, LocalConfig

# Re-exported: the clients' data (`client_data`) and the models' MACs (`metrics`).
from spafl_jax.client_data import ClientData, make_client_data, split_clients  # noqa: F401
from spafl_jax.metrics import layer_macs  # noqa: F401

IMPORTANCE_UPDATES = ('all_after', 'sampled_before', 'none')


@flax.struct.dataclass
class FederatedState:
    clients: ClientState  # every leaf [num_clients, ...]
    server_thresholds: Any  # tau_g, shaped like one client's thresholds
    last_delta: Any  # tau_g(r) - tau_g(r - 1), for the importance update
    round: jax.Array  # rounds completed (int32 scalar)


@dataclasses.dataclass(frozen=True)
class RoundConfig:
    clients_per_round: int = 10
    importance_update: str = (
        'all_after'  # 'all_after' (CIFAR folder), 'sampled_before' (FMNIST), 'none'
    )
    aggregation: str = 'uniform'  # 'uniform' (official) or 'data_size'
    client_execution: str = 'vmap'  # 'vmap' or 'map' (lax.map) over the sampled clients

    def __post_init__(self):
        name = type(self).__name__
        checks.number(
            name, 'clients_per_round', self.clients_per_round, positive=True, integer=True
        )
        checks.choice(name, 'importance_update', self.importance_update, IMPORTANCE_UPDATES)
        checks.choice(name, 'aggregation', self.aggregation, algorithm_lib.AGGREGATIONS)
        checks.choice(
            name, 'client_execution', self.client_execution, algorithm_lib.CLIENT_EXECUTIONS
        )


CLIENT_INITS = ('shared', 'independent')


def check_client_init(client_init: str) -> None:
    if client_init not in CLIENT_INITS:
        raise ValueError(f'client_init={client_init!r} is not known; use one of {CLIENT_INITS}.')


def client_init_keys(rng: jax.Array, num_clients: int, client_init: str = 'shared') -> jax.Array:
    """[num_clients] initialization keys: one key for everyone ('shared'), or fold_in(rng, k).

    'shared' is what the official code does (one model, deep-copied to every client), so row i of a
    layer is the same neuron on every client at the start and the mean of threshold i over clients
    means something. 'independent' draws every client's model from its own key.
    """
    check_client_init(client_init)
    if client_init == 'shared':  # one array op: a stack of N keys compiles for minutes at 10^5
        data = jax.random.key_data(rng)
        return jax.random.wrap_key_data(
            jnp.broadcast_to(data, (num_clients, *data.shape)), impl=jax.random.key_impl(rng)
        )
    return jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(num_clients))


def init_clients(
    model: nn.Module,
    cfg: LocalConfig,
    rng: jax.Array,
    *,
    num_clients: int,
    image_shape,
    client_init: str = 'shared',
) -> ClientState:
    """Every client's initial state, stacked on a leading client axis (see `client_init_keys`)."""
    keys = client_init_keys(rng, num_clients, client_init)
    return _init_clients(
        model, cfg, keys, tuple(int(d) for d in image_shape), client_init == 'shared'
    )


def initial_clients(
    model: nn.Module,
    cfg: LocalConfig,
    rng: jax.Array,
    ids,
    *,
    image_shape,
    client_init: str = 'shared',
) -> ClientState:
    """The initial states of the clients `ids` alone: rows `ids` of `init_clients` (a client
    store off the devices draws a client that never trained from its id, on demand)."""
    check_client_init(client_init)
    ids = jnp.asarray(ids, jnp.int32)
    if client_init == 'shared':
        keys = client_init_keys(rng, ids.shape[0], 'shared')
    else:
        keys = jax.vmap(lambda k: jax.random.fold_in(rng, k))(ids)
    return _init_clients(
        model, cfg, keys, tuple(int(d) for d in image_shape), client_init == 'shared'
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 3, 4))
def _init_clients(model, cfg, keys, image_shape, shared: bool) -> ClientState:
    def one(key):
        variables = models.init_variables(model, key, image_shape)
        return ClientState(
            params=variables['params'],
            thresholds=variables['thresholds'],
            batch_stats=variables['batch_stats'],
            opt_state=client_lib.init_opt_state(cfg, variables['params'], variables['thresholds']),
            collapsed=client_lib.init_collapsed(cfg, variables['thresholds']),
        )

    if shared:  # one model, copied: the same values as initializing each from the same key
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (keys.shape[0], *x.shape)), one(keys[0]))
    return jax.vmap(one)(keys)


_row_sums = jax.jit(jax.vmap(server.row_sums))


def init_state(
    model,
    cfg: LocalConfig,
    rng,
    *,
    num_clients,
    image_shape,
    client_init: str = 'shared',
    lazy_importance: bool = False,
) -> FederatedState:
    """Round 0's state. `lazy_importance`: the clients keep the lazy importance update's row sums
    and shifts (`server.lazy_importance_update`), which `importance_update='all_after'` then uses
    instead of updating every client's weights.

    One compiled program, alone or inside another (`execution.create_sharded`): the same floats."""
    return initial_state_of(
        model,
        cfg,
        rng,
        jnp.arange(num_clients, dtype=jnp.int32),
        image_shape=image_shape,
        client_init=client_init,
        lazy_importance=lazy_importance,
    )


def initial_state_of(
    model, cfg, rng, ids, *, image_shape, client_init='shared', lazy_importance=False
) -> FederatedState:
    """`init_state` of the clients `ids` only (their rows of it): what a client store starts
    from. One compiled program, alone or inside another (`execution.create_sharded`)."""
    check_client_init(client_init)
    return _init_state(
        model, cfg, rng, ids, tuple(int(d) for d in image_shape), client_init, lazy_importance
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 4, 5, 6))
def _init_state(model, cfg, rng, ids, image_shape, client_init, lazy_importance):
    clients = initial_clients(
        model, cfg, rng, ids, image_shape=image_shape, client_init=client_init
    )
    num_clients = ids.shape[0]
    if lazy_importance:
        if client_init == 'shared':  # one model's sums, copied (as a client store starts)
            first = jax.tree.map(lambda x: x[:1], (clients.params, clients.thresholds))
            sums = jax.tree.map(
                lambda s: jnp.broadcast_to(s, (num_clients, *s.shape[1:])), _row_sums(*first)
            )
        else:
            sums = _row_sums(clients.params, clients.thresholds)
        clients = clients.replace(
            row_sums=sums, shifts=jax.tree.map(jnp.zeros_like, clients.thresholds)
        )
    zeros = lambda: jax.tree.map(lambda t: jnp.zeros(t.shape[1:], t.dtype), clients.thresholds)
    # Separate buffers: the round donates its state, and one buffer cannot be donated twice.
    return FederatedState(
        clients=clients,
        server_thresholds=zeros(),
        last_delta=zeros(),
        round=jnp.zeros((), jnp.int32),
    )


def start_client(
    round_cfg: RoundConfig, cfg: LocalConfig, state: FederatedState, stored: ClientState
):
    """Step 2 of docs/algorithm.md, section 3, for one sampled client: it receives tau_g and, under
    `importance_update='sampled_before'` (the FMNIST folder), last round's importance update.
    Returns (client, the optimizer state its local work starts from)."""
    client = materialize(stored).replace(thresholds=state.server_thresholds)
    if round_cfg.importance_update == 'sampled_before':
        client = client.replace(params=server.importance_update(client.params, state.last_delta))
    return client, client_lib.round_opt_state(cfg, client)


def end_client(cfg: LocalConfig, client: ClientState, opt_state):
    """Step 3's end: the client keeps its model (and its momentum if persistent), sends tau_k."""
    if cfg.persistent_optimizer:
        client = client.replace(opt_state=opt_state)
    if is_lazy(client):  # the stored kernel is now the trained one: nothing pending
        client = client.replace(row_sums=server.row_sums(client.params, client.thresholds))
    return client, client.thresholds


def is_lazy(clients: ClientState) -> bool:
    """Whether the clients keep the lazy importance update (`init_state(lazy_importance=True)`)."""
    return bool(jax.tree.leaves(clients.shifts))


def materialize(client: ClientState) -> ClientState:
    """One client with the importance updates it has pending applied to its weights, and none left
    pending; the client itself when it keeps no lazy update. For `[N, ...]` clients, vmap it."""
    if not is_lazy(client):
        return client
    return client.replace(
        params=server.apply_shifts(client.params, client.shifts),
        shifts=jax.tree.map(jnp.zeros_like, client.shifts),
    )


def lazy_update_everyone(clients, delta, kernels):
    """Step 6 in its lazy form for every client of `clients` (`[N, ...]`: their row sums and
    shifts; `server.lazy_importance_update`), `kernels` giving each masked layer's shape. The one
    place of it: the device state's round (`server_update`) and the client stores' resident part
    (`store.StoreRunner`) both call it."""
    sums, shifts = jax.vmap(server.lazy_importance_update, in_axes=(0, 0, None, None))(
        clients.row_sums, clients.shifts, delta, kernels
    )
    return clients.replace(row_sums=sums, shifts=shifts)


def server_update(
    round_cfg: RoundConfig, state: FederatedState, new_global, clients: ClientState
) -> FederatedState:
    """Steps 4-6: tau_g becomes `new_global` (the mean of the trained clients' thresholds); its
    change reaches every client's weights under `importance_update='all_after'` (the CIFAR folders).
    `clients` is every client, the trained ones already written back."""
    delta = jax.tree.map(jnp.subtract, new_global, state.server_thresholds)
    if round_cfg.importance_update == 'all_after' and is_lazy(clients):
        kernels = masking.kernels_of(jax.tree.map(lambda p: p[0], clients.params), delta)
        clients = lazy_update_everyone(clients, delta, kernels)
    elif round_cfg.importance_update == 'all_after':
        clients = clients.replace(
            params=jax.vmap(server.importance_update, in_axes=(0, None))(clients.params, delta)
        )
    return FederatedState(
        clients=clients, server_thresholds=new_global, last_delta=delta, round=state.round + 1
    )


def algorithm(
    model: nn.Module, cfg: LocalConfig, round_cfg: RoundConfig, macs=None
) -> algorithm_lib.Algorithm:
    """SpaFL as an `algorithm.Algorithm`: what `run_round` and `execution.RoundRunner` drive."""
    previous = cfg.collapse_check == 'previous'  # a test changes the clients (`test_thresholds`)

    def round_constants(state):
        r = state.round
        return client_lib.learning_rate(cfg, r), cfg.th_coeff * client_lib.penalty_scale(cfg, r)

    def client_step(client, opt_state, x, y, example_mask, constants, key):
        del key  # SpaFL's steps draw nothing
        lr, penalty_coeff = constants
        return client_lib.local_step(
            model,
            cfg,
            client,
            opt_state,
            x,
            y,
            jnp.bool_(True),
            lr=lr,
            penalty_coeff=penalty_coeff,
            macs=macs,
            example_mask=example_mask,
        )

    def eval_variables(state, client, count):
        del state
        first, rest, _ = test_thresholds(cfg, client, count)
        params = materialize(client).params
        variables = lambda t: {
            'params': params,
            'thresholds': t,
            'batch_stats': client.batch_stats,
        }
        return variables(first), variables(rest)

    return algorithm_lib.Algorithm(
        name='spafl',
        model=model,
        state_type=FederatedState,
        round_constants=round_constants,
        client_start=lambda state, stored, key: start_client(round_cfg, cfg, state, stored),
        client_step=client_step,
        client_end=functools.partial(end_client, cfg),
        server_update=functools.partial(server_update, round_cfg),
        eval_variables=eval_variables,
        eval_density=lambda state, clients, counts: tested_density_stats(cfg, clients, counts),
        tested=(lambda state, clients, counts: tested_clients(cfg, clients, counts))
        if previous
        else algorithm_lib.unchanged,
        first_test_batch=cfg.batch_size if previous else 0,
    )


def run_round(
    model: nn.Module,
    local_cfg: LocalConfig,
    round_cfg: RoundConfig,
    spec: DataSpec,
    state: FederatedState,
    data: ClientData,
    sampled: jax.Array,
    seed_key: jax.Array,
    *,
    macs=None,
):
    """One SpaFL round (docs/algorithm.md, section 3): `algorithm.run_round` of `algorithm(...)`,
    the readable reference of `execution.RoundRunner`. `sampled` holds the [clients_per_round]
    client ids."""
    return algorithm_lib.run_round(
        algorithm(model, local_cfg, round_cfg, macs),
        local_cfg,
        spec,
        state,
        data,
        sampled,
        seed_key,
        aggregation=round_cfg.aggregation,
        client_execution=round_cfg.client_execution,
    )


def make_round_fn(model, local_cfg, round_cfg, spec, *, macs=None):
    """`run_round` compiled once: (state, data, sampled, seed_key) -> (state, metrics), the state
    donated (`algorithm.make_round_fn`)."""
    return algorithm_lib.make_round_fn(
        algorithm(model, local_cfg, round_cfg, macs),
        local_cfg,
        spec,
        aggregation=round_cfg.aggregation,
        client_execution=round_cfg.client_execution,
    )


def test_thresholds(cfg: LocalConfig, client: ClientState, count):
    """The thresholds a client's test uses, and the client after it (`LocalConfig.collapse_check`).

    Returns (first, rest, tested): the thresholds of the first test batch of `cfg.batch_size`
    examples and of the later ones, and the client with its state after the test.

    'current': every batch resets the collapsed layers of the mask it is about to use; the client
    is unchanged. 'previous' (the official code, which tests in batches of the training batch
    size): the first batch resets what the client's previous forward pass found collapsed, the
    second what the first batch found, and the resets stay in the client's thresholds. A client
    without test examples runs no forward pass and is unchanged.
    """
    params = materialize(client).params
    if cfg.collapse_check != 'previous':
        used = masking.reset_collapsed_thresholds(params, client.thresholds)
        return used, used, client
    first = masking.reset_flagged(client.collapsed, client.thresholds)
    flags = masking.collapsed_layers(params, first)
    rest = masking.reset_flagged(flags, first)
    later = count > cfg.batch_size
    pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(later, x, y), a, b)
    thresholds = pick(rest, first)
    tested = client.replace(
        thresholds=thresholds, collapsed=pick(masking.collapsed_layers(params, rest), flags)
    )
    tested = jax.tree.map(lambda new, old: jnp.where(count > 0, new, old), tested, client)
    return first, rest, tested


def evaluate_client(
    model: nn.Module,
    spec: DataSpec,
    client: ClientState,
    images,
    labels,
    example_ids,
    count,
    *,
    batch_size: int,
    cfg: LocalConfig = LocalConfig(),
):
    """Correct predictions of one client's own model on its own (padded) test examples
    (`algorithm.evaluate_client` of SpaFL): only the batches that hold real examples run, with the
    thresholds `test_thresholds` gives."""
    return algorithm_lib.evaluate_client(
        algorithm(model, cfg, RoundConfig()),
        spec,
        None,
        client,
        images,
        labels,
        example_ids,
        count,
        batch_size=batch_size,
    )


def evaluate(
    model,
    spec,
    clients: ClientState,
    data: ClientData,
    *,
    batch_size: int,
    cfg: LocalConfig = LocalConfig(),
):
    """Per-client accuracy on its own test split and per-client, per-layer densities.

    Returns a dict of arrays: correct [N], counts [N], layer_density [N, L] (kept-row fraction),
    kept_weights [N] (masked weights in kept rows). Under `collapse_check='previous'` the test
    changes the clients (`test_thresholds`): `tested_clients` gives them.
    """
    # SpaFL's evaluation reads nothing of the state but its clients.
    return algorithm_lib.evaluate(
        algorithm(model, cfg, RoundConfig()), spec, _Clients(clients), data, batch_size=batch_size
    )


@dataclasses.dataclass(frozen=True)
class _Clients:
    clients: ClientState


def tested_clients(cfg: LocalConfig, clients: ClientState, counts) -> ClientState:
    """Every client as its test leaves it (`test_thresholds`), `[N, ...]`."""
    return jax.vmap(lambda c, n: test_thresholds(cfg, c, n)[2])(clients, counts)


def tested_density_stats(cfg: LocalConfig, clients: ClientState, counts):
    """`density_stats` of the masks the clients' test used last."""
    if cfg.collapse_check != 'previous':
        return density_stats(clients)
    return density_stats(tested_clients(cfg, clients, counts), reset=False)


def density_stats(clients: ClientState, reset: bool = True):
    """Kept-row fraction per client and layer, and kept masked weights per client.

    The masks are those the evaluated model uses: with `reset`, a collapsed layer (at most 1 % of
    rows kept) has its thresholds reset first, as in every forward pass (the official code reports
    the kept fraction of the mask its test used last, which is after that reset). Without it, the
    thresholds as they are (`tested_density_stats` under `collapse_check='previous'`).
    """

    def one(params, thresholds):
        if reset:
            thresholds = masking.reset_collapsed_thresholds(params, thresholds)
        kernels = masking.kernels_of(params, thresholds)
        masks = jax.tree.map(masking.hard_row_mask, kernels, thresholds)
        fractions = jnp.stack([jnp.mean(m.astype(jnp.float32)) for m in jax.tree.leaves(masks)])
        kept = sum(
            jnp.sum(m) * (k.size // k.shape[-1])
            for m, k in zip(jax.tree.leaves(masks), jax.tree.leaves(kernels))
        )
        return fractions, kept

    fractions, kept = jax.vmap(lambda c: one(materialize(c).params, c.thresholds))(clients)
    return {'layer_density': fractions, 'kept_weights': kept}


def make_eval_fn(model, spec, *, batch_size, cfg: LocalConfig = LocalConfig()):
    return jax.jit(functools.partial(evaluate, model, spec, batch_size=batch_size, cfg=cfg))
