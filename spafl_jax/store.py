"""Client stores: where the clients' models live between rounds when they need not all be on the
devices.

SpaFL keeps one personalized model per client, so the all-client state grows with the number of
clients N: 153 kB per digits-CNN client is 15 GB at N = 10^5, 1.7 MB per LeNet-5 client is 1.7 TB at
10^6. A round reads and writes only its sampled cohort, and with the lazy importance update
(`server.lazy_importance_update`) the server's update reaches the other clients through two small
numbers per row. So the state splits in two:

- the *resident* part, on the devices and sharded over the `clients` mesh axis: the server's
  thresholds and, per client, the lazy update's row sums and shifts (`light`);
- the *stored* part, each client's weights, thresholds, BatchNorm statistics and momentum (`heavy`),
  kept in one of the tiers behind the same `read(ids)` / `write(ids, rows)` interface:

  - 'device': not a store: the whole state on the mesh (`execution.RoundRunner`), the default while
    it fits;
  - 'host': `HostStore`, a `[N, width]` float32 array in this process's memory;
  - 'disk': `DiskStore`, a tensorstore zarr array with one chunk (one file) per client.

A client that never trained is not stored: it is its initial model, drawn from (seed, id) when it is
read (`federated.initial_clients`), so a store costs memory or disk only for the clients that have
trained. `StoreRunner` runs the rounds: it reads the cohort, trains it with `RoundRunner`'s program
(`cohort=True`), writes it back and updates the resident part of everyone; the next round's cohort
is known from (seed, round) and is read while the current round trains. It computes exactly what the
'device' tier computes (tests/test_store.py).

The tiers themselves (`refusal`, `heavy` / `light` / `merge`, `Layout`, `HostStore`, `DiskStore`,
`open_store`) are in `store_tiers`, and re-exported here.
"""

from __future__ import annotations

import concurrent.futures
import functools
import time
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from spafl_jax import execution
from spafl_jax import federated
from spafl_jax import masking
from spafl_jax.client import ClientState
from spafl_jax.federated import FederatedState
from spafl_jax.store_tiers import (  # noqa: F401 (re-exported: store.Layout, store.refusal, ...)
    TIERS,
    DiskStore,
    HostStore,
    Layout,
    heavy,
    light,
    merge,
    open_store,
    refusal,
)


# ------------------------------------------------------------------------------------------------
# Rounds over a store.


class StoreRunner:
    """The rounds and evaluations of SpaFL with the clients' models in a `HostStore` or `DiskStore`.

    The state it takes and returns is the resident part (`init_state`): a `FederatedState` whose
    `clients` hold only the lazy update's row sums and shifts, sharded over the mesh. `run_round`
    reads the round's cohort, in the order `RoundRunner.plan` puts it on the devices, merges it
    with its resident part, runs the round on it, writes the trained clients back and updates every
    client's resident part. One worker thread does the store's reads and writes in the order they
    were asked: the next round's cohort is read while this round trains, and a client trained this
    round and sampled again the next is taken from this round's result, not from the store.

    `importance_update='all_after'` must run lazily (the eager form rewrites every client's
    weights every round, which a store exists to avoid), and the official collapse check
    (`collapse_check='previous'`, where a test changes the clients) is evaluated only in place.
    """

    def __init__(
        self,
        runner: execution.RoundRunner,
        store,
        initial: Callable[[np.ndarray], Any],
        *,
        kernels: Any = None,
        eval_clients: int = 256,
    ):
        if not runner.cohort:
            raise ValueError('StoreRunner needs a RoundRunner built with cohort=True.')
        self.runner, self.store, self.layout = runner, store, store.layout
        self.initial = initial
        self._kernels = kernels  # the masked kernels' shapes (the lazy recurrence's n and D)
        self.devices = runner.devices
        self.num_clients = runner.num_clients
        self.eval_clients = max(-(-int(eval_clients) // self.devices), 1) * self.devices
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='client-store')
        # Seconds, summed: the worker's reads and writes, and the host's waits for a cohort's rows.
        self.seconds = {'read': 0.0, 'write': 0.0, 'wait': 0.0}
        self._prefetch = None  # (ids, future of their rows) of the next round's cohort
        self._previous = None  # (ids, future of their trained rows) of the round just dispatched
        self._build()

    # -- device programs ----------------------------------------------------------------------

    def _build(self):
        sharded = jax.sharding.NamedSharding(
            self.runner.mesh, jax.sharding.PartitionSpec('clients')
        )
        self._sharded = sharded
        lazy = self.runner.round_cfg.importance_update == 'all_after'

        @jax.jit
        def gather_light(resident: ClientState, ids):
            take = lambda x: jax.lax.with_sharding_constraint(x[jnp.maximum(ids, 0)], sharded)
            return jax.tree.map(take, resident)

        @functools.partial(jax.jit, donate_argnums=(0,))  # in place: N clients' rows
        def update_resident(resident: FederatedState, ids, cohort: FederatedState, kernels):
            clients = resident.clients
            if lazy:  # the server's update reaches everyone: the recurrence on each client's rows
                clients = federated.lazy_update_everyone(clients, cohort.last_delta, kernels)
            # The cohort had it inside its round; its rows replace everyone's update of them.
            index = jnp.where(ids >= 0, ids, self.runner.padded_clients)  # out of range: dropped
            clients = jax.tree.map(
                lambda x, v: x.at[index].set(v, mode='drop'), clients, light(cohort.clients)
            )
            return cohort.replace(clients=clients)

        @jax.jit
        def finite(trained: ClientState, server_thresholds, ids):
            def all_finite(tree):
                real = ids >= 0
                return jnp.all(
                    jnp.stack(
                        [jnp.array(True)]
                        + [
                            jnp.all(jnp.isfinite(x) | ~real.reshape(-1, *[1] * (x.ndim - 1)))
                            for x in jax.tree.leaves(tree)
                        ]
                    )
                )

            return {
                'weights': all_finite((trained.params, trained.opt_state)),
                'batch_stats': all_finite(trained.batch_stats),
                'thresholds': all_finite(trained.thresholds)
                & jnp.all(
                    jnp.stack(
                        [jnp.array(True)]
                        + [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(server_thresholds)]
                    )
                ),
            }

        self._gather_light = gather_light
        self._update_resident = update_resident
        self._finite = finite

    # -- reading and writing clients ----------------------------------------------------------

    def _read(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids` (-1: an empty position, any row): stored ones from the store, the others
        their initial models. Runs on the worker thread."""
        start = time.perf_counter()
        real = ids >= 0
        rows = np.zeros((len(ids), self.layout.width), np.float32)
        if real.any():
            rows[real] = self.store.read(ids[real])
        fresh = real & (rows[:, 0] == 0)
        if fresh.any():
            rows[fresh] = self.layout.ravel(self.initial(ids[fresh]))
        self.seconds['read'] += time.perf_counter() - start
        return rows

    def _write(self, ids: np.ndarray, clients, tag: int) -> np.ndarray:
        """Writes the trained `clients` (device arrays, still being computed) of `ids` as of
        round `tag`; returns their rows. Runs on the worker thread, so the host never waits for the
        device here."""
        rows = self.layout.ravel(jax.device_get(clients))
        start = time.perf_counter()  # from when the round's result is there
        real = ids >= 0
        if real.any():
            self.store.write(ids[real], rows[real], tag)
        self.seconds['write'] += time.perf_counter() - start
        return rows

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """The rows of `ids` as of now: the prefetched read if it was of these ids, patched with
        the trained rows of the round just dispatched (which the read may predate)."""
        start = time.perf_counter()
        if self._prefetch is not None and np.array_equal(self._prefetch[0], ids):
            rows = self._prefetch[1].result()
        else:
            rows = self._worker.submit(self._read, ids).result()
        self._prefetch = None
        if self._previous is not None:
            before, future = self._previous
            again = np.flatnonzero(np.isin(ids, before[before >= 0]) & (ids >= 0))
            if len(again):
                position = {int(c): i for i, c in enumerate(before)}
                rows[again] = future.result()[[position[int(c)] for c in ids[again]]]
        self.seconds['wait'] += time.perf_counter() - start
        return rows

    def _cohort_state(self, resident: FederatedState, ids: np.ndarray, rows: np.ndarray):
        ids_dev = jax.device_put(np.asarray(ids, np.int32), self.runner.replicated)
        stored = jax.device_put(self.layout.unravel(rows), self._sharded)
        clients = merge(stored, self._gather_light(resident.clients, ids_dev))
        return resident.replace(clients=clients), ids_dev

    def prefetch(self, sampled: np.ndarray) -> None:
        """Starts reading the cohort of a later round (`sampled`: its ids, in any order)."""
        ids = self.runner.plan(np.sort(np.asarray(sampled))).sampled
        self._prefetch = (ids, self._worker.submit(self._read, ids))

    # -- the public calls ---------------------------------------------------------------------

    def place_state(self, resident: FederatedState) -> FederatedState:
        """`resident` (as a checkpoint restores it: host arrays, no phantoms) on the mesh."""
        leaves = jax.tree.leaves(resident.clients)
        if leaves and leaves[0].shape[0] != self.runner.padded_clients:
            resident = resident.replace(
                clients=execution.pad_clients(resident.clients, self.runner.padded_clients)
            )
        replicated = self.runner.replicated
        return FederatedState(
            clients=jax.device_put(resident.clients, self._sharded),
            server_thresholds=jax.device_put(resident.server_thresholds, replicated),
            last_delta=jax.device_put(resident.last_delta, replicated),
            round=jax.device_put(resident.round, replicated),
        )

    def run_round(
        self,
        resident: FederatedState,
        sampled: np.ndarray,
        seed_key,
        next_sampled=None,
        round_index: int = 0,
    ):
        """One round -> (new resident state, metrics), as `RoundRunner.run_round` on every client.
        `next_sampled`: the next round's clients, read while this round trains; `round_index`:
        the round, which tags the store's writes (`DiskStore.rollback`). `last_finite` then says
        whether the trained clients and the server's thresholds are finite."""
        resident = self.place_state(resident)
        sampled = np.sort(np.asarray(sampled))
        ids = self.runner.plan(sampled).sampled
        cohort, ids_dev = self._cohort_state(resident, ids, self._rows(ids))
        cohort, metrics = self.runner.run_round(cohort, sampled, seed_key)
        if next_sampled is not None:
            self.prefetch(next_sampled)
        trained = heavy(cohort.clients)
        self._previous = (
            ids,
            self._worker.submit(self._write, ids, trained, int(round_index) + 1),
        )
        self.last_finite = self._finite(trained, cohort.server_thresholds, ids_dev)
        resident = self._update_resident(resident, ids_dev, cohort, self._kernels)
        return resident, metrics

    def flush(self) -> None:
        """Waits until every write asked for is in the store."""
        if self._previous is not None:
            self._previous[1].result()

    def map_clients(self, resident: FederatedState, fn, clients: np.ndarray | None = None):
        """`fn(state, ids)` on the clients `clients` (default: all), a chunk of `eval_clients`
        at a time (the next chunk read while this one is used): `state` is the resident state with
        the chunk as its clients (-1 ids: padding), `fn` returns `[len(ids), ...]` arrays, of
        which the real rows are concatenated (numpy, in the order of `clients`)."""
        resident = self.place_state(resident)
        clients = np.arange(self.num_clients) if clients is None else np.asarray(clients)
        size = self.eval_clients
        chunks = [clients[i : i + size] for i in range(0, len(clients), size)]
        padded = [np.pad(c, (0, size - len(c)), constant_values=-1) for c in chunks]
        reads = [self._worker.submit(self._read, padded[0])] if padded else []
        out = []
        for i, ids in enumerate(padded):
            if i + 1 < len(padded):
                reads.append(self._worker.submit(self._read, padded[i + 1]))
            rows = reads[i].result()  # after every write asked for before: the worker keeps order
            state, _ = self._cohort_state(resident, ids, rows)
            part = fn(state, ids)
            out.append(jax.tree.map(lambda x, n=len(chunks[i]): np.asarray(x)[:n], part))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *out)

    def evaluate_clients(self, resident: FederatedState, clients: np.ndarray) -> dict:
        """`RoundRunner.evaluate` of the clients `clients`, read a chunk at a time (the next chunk
        while this one is tested): arrays `[len(clients), ...]` in their order."""

        def evaluate(state, ids):
            # `evaluate_clients` leaves padding out, which sits at the end of a chunk.
            return self.runner.evaluate_clients(state, ids)

        return self.map_clients(resident, evaluate, clients)

    def evaluate(self, resident: FederatedState) -> dict:
        """Every client: `[num_clients, ...]` (the sweep)."""
        return self.evaluate_clients(resident, np.arange(self.num_clients))

    def stored_clients(self, resident: FederatedState, clients: np.ndarray) -> ClientState:
        """The full states of `clients` (host arrays): stored part and resident part."""
        ids = np.asarray(clients, np.int64)
        self.flush()
        rows = self._worker.submit(self._read, ids).result()
        part = jax.device_get(jax.tree.map(lambda x: x[ids], resident.clients))
        return merge(self.layout.unravel(rows), part)

    def close(self) -> None:
        self.flush()
        self._worker.shutdown(wait=True)
        self.store.close()


def make_store_runner(
    model,
    local_cfg,
    round_cfg,
    spec,
    train_data,
    test_data,
    *,
    tier: str,
    rng: jax.Array,
    image_shape,
    client_init: str = 'shared',
    directory: str | None = None,
    eval_clients: int = 256,
    **runner_kwargs,
) -> tuple[StoreRunner, FederatedState]:
    """A `StoreRunner` with its clients in `tier` ('host' or 'disk'), and round 0's resident
    state. `rng` is the initialization key `federated.init_state` takes: the clients that never
    trained are the models `init_state` would have given them."""
    if round_cfg.importance_update not in federated.IMPORTANCE_UPDATES:
        raise ValueError(f'importance_update={round_cfg.importance_update!r} is not known.')
    problem = refusal(
        tier,
        importance_update=round_cfg.importance_update,
        lazy_importance=True,  # the resident state is the lazy update's by construction
        collapse_check=local_cfg.collapse_check,
        multi_process=jax.process_count() > 1,
    )
    if problem:
        raise ValueError(problem)
    runner = execution.RoundRunner(
        model, local_cfg, round_cfg, spec, train_data, test_data, cohort=True, **runner_kwargs
    )
    image_shape = tuple(int(d) for d in image_shape)

    def initial(ids):
        return heavy(
            federated.initial_clients(
                model, local_cfg, rng, ids, image_shape=image_shape, client_init=client_init
            )
        )

    one = jax.tree.map(lambda x: x[0], initial(np.zeros(1, np.int32)))
    layout = Layout(one)
    store = open_store(tier, layout, runner.num_clients, directory)
    if client_init == 'shared':  # one initial model: computed once, copied
        first = layout.unravel(layout.ravel(initial(np.zeros(1, np.int32))))
        initial_fn = (
            lambda ids: jax.tree.map(  # noqa: E731
                lambda x: np.broadcast_to(x, (len(ids), *x.shape[1:])), first
            )
        )
    else:
        initial_fn = initial

    def initial_sums(ids):  # as `federated.init_state` computes them, to the last bit
        state = federated.initial_state_of(
            model,
            local_cfg,
            rng,
            ids,
            image_shape=image_shape,
            client_init=client_init,
            lazy_importance=True,
        )
        return jax.device_get(state.clients.row_sums)

    resident = _initial_resident(runner, round_cfg, one, initial_sums, client_init == 'shared')
    kernels = jax.tree.map(
        lambda k: jax.ShapeDtypeStruct(k.shape, k.dtype),
        masking.kernels_of(one.params, one.thresholds),
    )
    store_runner = StoreRunner(
        runner, store, initial_fn, kernels=kernels, eval_clients=eval_clients
    )
    return store_runner, resident


def _initial_resident(
    runner, round_cfg, one: ClientState, initial_sums, shared: bool
) -> FederatedState:
    """Round 0's resident state: the server's zeros and every client's row sums and zero shifts
    (lazy `all_after`; nothing per client otherwise), padded to the mesh and sharded over it."""
    n = runner.padded_clients
    sharded = jax.sharding.NamedSharding(runner.mesh, jax.sharding.PartitionSpec('clients'))
    replicated = jax.sharding.NamedSharding(runner.mesh, jax.sharding.PartitionSpec())
    zeros = lambda: jax.tree.map(  # noqa: E731
        lambda t: jax.device_put(np.zeros(t.shape, t.dtype), replicated), one.thresholds
    )
    if round_cfg.importance_update == 'all_after':
        chunk = 1 if shared else 1024  # shared: one model, its sums copied
        sums = []
        for start in range(0, runner.num_clients, chunk):
            sums.append(initial_sums(np.arange(start, min(start + chunk, runner.num_clients))))
            if shared:
                break
        row_sums = jax.tree.map(lambda *xs: np.concatenate(xs), *sums)
        if shared:
            row_sums = jax.tree.map(
                lambda x: np.broadcast_to(x, (runner.num_clients, *x.shape[1:])), row_sums
            )
        row_sums = jax.tree.map(
            lambda x: np.pad(x, ((0, n - runner.num_clients),) + ((0, 0),) * (x.ndim - 1)),
            row_sums,
        )
        clients = light(one).replace(
            row_sums=jax.device_put(row_sums, sharded),
            shifts=jax.tree.map(
                lambda x: jax.device_put(np.zeros(x.shape, x.dtype), sharded), row_sums
            ),
        )
    else:
        clients = light(one.replace(row_sums=(), shifts=()))
    return FederatedState(
        clients=clients,
        server_thresholds=zeros(),
        last_delta=zeros(),
        round=jax.device_put(np.zeros((), np.int32), replicated),
    )
