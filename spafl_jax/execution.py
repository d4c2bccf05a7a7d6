"""How a round's client work reaches the hardware: execution strategies over the client axis, the
`clients` device mesh, multi-host start-up, and `make_round_runner`, the one entry point of `train.py`.

Every strategy computes exactly `federated.run_round` (docs/algorithm.md, section 3): the same
`client.local_step` on the same batches with the same keys, drawn from (seed, round, client id) by
`client.local_schedule`, so results never depend on the strategy or the number of devices. They differ
only in how the local steps are issued:

- 'map': a device's clients one after the other inside one compiled call per round, each for
  exactly its real steps (`client.real_steps`: no padding, no per-step dispatch); the CPU's form.
- 'vmap': `lanes` clients step together under `vmap`, each lane working through a queue of clients
  packed so that the lanes' step counts are even; the form accelerators want.

On a mesh with a `clients` axis, the all-client state is sharded along it, each device trains its
share of the sampled clients (packed by step count), and the messages (SpaFL: the thresholds) and the
per-client metrics are gathered over the axis inside `jax.shard_map` and added in client-id order
(`server.aggregate(..., axis_name='clients')`, `algorithm.round_metrics`): the same program runs on
one device, on several, and across hosts, and gives the same bits on each.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from spafl_jax import algorithm as algorithm_lib
from spafl_jax import client as client_lib
from spafl_jax import federated
from spafl_jax import hardware
from spafl_jax.client import DataSpec, LocalConfig
from spafl_jax.federated import ClientData, RoundConfig

# Re-exported: the runtime set-up and the strategy choice live in `hardware`.
from spafl_jax.hardware import (  # noqa: F401
    AUTO_CPU_DEVICES,
    CLIENT_EXECUTIONS,
    DISTRIBUTED,
    any_process,
    auto_cpu_devices,
    barrier,
    host_local,
    initialize_from_config,
    initialize_runtime,
    resolve_client_execution,
)

CLIENTS = 'clients'  # the mesh axis the client dimension is sharded along


# ------------------------------------------------------------------------------------------------
# The mesh.


def make_mesh(num_clients: int, devices=None) -> Mesh:
    """A 1-D mesh over the `clients` axis: every device, or one per client when there are fewer.

    The client axis is padded to a whole number of clients per device with phantom clients that
    are never sampled and never reported (`RoundRunner.padded_clients`), so 100 clients use all 8
    GPUs of a host (13 on each, 4 phantoms) and 10^6 clients all 256 chips of a pod.
    """
    devices = list(jax.devices() if devices is None else devices)
    size = len(devices)
    if num_clients < size:
        if jax.process_count() > 1:
            raise ValueError(
                f'num_clients={num_clients} is fewer than the {size} devices of a multi-host '
                'run, where every device takes part: use more clients or fewer hosts.'
            )
        size = num_clients
        logging.warning('using %d of %d devices: one per client.', size, len(devices))
    return Mesh(np.array(devices[:size]), (CLIENTS,))


def padded_count(num_clients: int, devices: int) -> int:
    """Clients on the mesh: `num_clients` rounded up to a whole number per device."""
    return -(-num_clients // devices) * devices


def pad_clients(tree, count: int):
    """Every leaf's client axis extended to `count` with copies of client 0 (phantoms: finite
    values, never sampled, sliced off before anything is reported or saved)."""

    def pad(x):
        extra = count - x.shape[0]
        if extra <= 0:
            return x
        if isinstance(x, np.ndarray):
            return np.concatenate([x, np.repeat(x[:1], extra, axis=0)])
        return jnp.concatenate([x, jnp.repeat(x[:1], extra, axis=0)])

    return jax.tree.map(pad, tree)


def create_sharded(init_fn, num_clients: int, mesh: Mesh | None = None):
    """`init_fn()` (a state with a client axis, `state.clients`) created where it lives: one
    compiled call whose outputs are laid out as `RoundRunner.state_sharding` (clients padded with
    phantoms and sharded over the mesh, the rest replicated), so each device builds only its own
    clients and no device ever holds all of them (10^5 digits-CNN clients are 15 GB)."""
    mesh = mesh if mesh is not None else make_mesh(num_clients)
    count = padded_count(num_clients, mesh.devices.size)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(CLIENTS))
    shapes = jax.eval_shape(init_fn)
    sharding = jax.tree.map(lambda _: replicated, shapes).replace(
        clients=jax.tree.map(lambda _: sharded, shapes.clients)
    )

    def padded():
        state = init_fn()
        return state.replace(clients=pad_clients(state.clients, count))

    return jax.jit(padded, out_shardings=sharding)()


# ------------------------------------------------------------------------------------------------
# Host-side planning of a round: which device and lane runs which client, and in what order.


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """Where every local step of a round runs. Built on the host from the sampled ids and the
    start-up step counts (no device round trip); every array has a fixed shape, so no retracing.

    Attributes:
      sampled: [devices * per_device] client ids, device-major; -1 marks an empty position.
      positions: [devices, max_slots, lanes] the position (within the device) of the client a lane
        steps at each slot.
      steps: [devices, max_slots, lanes] index of that step in the client's `local_schedule`.
      valid: [devices, max_slots, lanes] False for padding.
      slots: [devices] slots the device really needs (the in-jit trip count).
      real_steps: local steps of the round (sum over sampled clients).
    """

    sampled: np.ndarray
    positions: np.ndarray
    steps: np.ndarray
    valid: np.ndarray
    slots: np.ndarray
    real_steps: int

    def executed_steps(self) -> int:
        """Steps the hardware runs: each device's slots times its lanes, padding included."""
        return int(self.slots.sum()) * self.positions.shape[2]


def _least_loaded(loads: list[int], sizes: list[int], capacity: int) -> int:
    free = [i for i in range(len(loads)) if sizes[i] < capacity]
    return min(free, key=lambda i: (loads[i], i))


def plan_round(
    sampled: np.ndarray,
    steps_per_epoch: np.ndarray,
    *,
    epochs: int,
    stride: int,
    devices: int,
    lanes: int,
    max_slots: int,
) -> RoundPlan:
    """Packs the sampled clients onto devices, then lanes, longest first (LPT scheduling).

    Args:
      sampled: [S] client ids.
      steps_per_epoch: [num_clients] real steps per epoch of every client
        (`client.steps_per_epoch`).
      epochs: local epochs.
      stride: steps per epoch of the padded schedule (`client.steps_per_epoch` of max_count).
      devices, lanes: mesh size and lanes per device.
      max_slots: the fixed slot-table length (an upper bound on any lane's steps).
    """
    sampled = np.asarray(sampled, np.int64)
    per_device = -(-len(sampled) // devices)
    lanes = min(lanes, per_device)
    order = sorted(sampled.tolist(), key=lambda c: (-int(steps_per_epoch[c]), c))
    members: list[list[int]] = [[] for _ in range(devices)]
    loads = [0] * devices
    for c in order:
        d = _least_loaded(loads, [len(m) for m in members], per_device)
        members[d].append(c)
        loads[d] += int(steps_per_epoch[c]) * epochs
    table_sampled = np.full((devices, per_device), -1, np.int32)
    positions = np.zeros((devices, max_slots, lanes), np.int32)
    steps = np.zeros((devices, max_slots, lanes), np.int32)
    valid = np.zeros((devices, max_slots, lanes), bool)
    slots = np.zeros(devices, np.int32)
    for d, clients in enumerate(members):
        table_sampled[d, : len(clients)] = clients
        queues: list[list[int]] = [[] for _ in range(lanes)]
        lane_loads = [0] * lanes
        for pos, c in enumerate(clients):  # already longest first
            lane = _least_loaded(lane_loads, [0] * lanes, 1)
            queues[lane].append(pos)
            lane_loads[lane] += int(steps_per_epoch[c]) * epochs
        for lane, queue in enumerate(queues):
            t = 0
            for pos in queue:
                n = int(steps_per_epoch[clients[pos]])
                for e in range(epochs):
                    positions[d, t : t + n, lane] = pos
                    steps[d, t : t + n, lane] = e * stride + np.arange(n)
                    valid[d, t : t + n, lane] = True
                    t += n
            if t > max_slots:
                raise ValueError(
                    f'a lane needs {t} steps, more than the table holds ({max_slots}).'
                )
            # Padding repeats the lane's last position so a padded step reads a real client.
            if queue:
                positions[d, t:, lane] = queue[-1]
        slots[d] = max(lane_loads) if lane_loads else 0
    real_steps = int(sum(int(steps_per_epoch[c]) * epochs for c in sampled))
    return RoundPlan(
        sampled=table_sampled.reshape(-1),
        positions=positions,
        steps=steps,
        valid=valid,
        slots=slots,
        real_steps=real_steps,
    )


def max_lane_steps(steps_per_epoch: np.ndarray, epochs: int, per_device: int) -> int:
    """An upper bound on the steps of any lane: the `per_device` largest clients back to back."""
    largest = np.sort(np.asarray(steps_per_epoch))[::-1][:per_device]
    return max(int(largest.sum()) * epochs, 1)


# ------------------------------------------------------------------------------------------------
# Device-side pieces, written for one device's shard (they run inside `jax.shard_map`).


@flax.struct.dataclass
class RoundWork:
    """The sampled clients of a round on one device, `[per_device, ...]`, while they train."""

    clients: Any  # as `Algorithm.client_start` started them
    opt_state: Any  # this round's optimizer state
    metrics: Any  # per-client sums: loss, correct, steps, flops
    batch_ids: jax.Array  # [per_device, schedule_steps, batch] example ids of every step
    batch_mask: Any  # [per_device, schedule_steps, batch] real examples; None: all full
    step_keys: jax.Array  # [per_device, schedule_steps] augmentation keys
    steps_per_epoch: jax.Array  # [per_device] real steps per epoch; 0 for an empty position
    weights: jax.Array  # [per_device] aggregation weight; 0 for an empty position
    final_ids: Any = None  # [per_device, batch] the batch of `Algorithm.client_final`, if any
    final_keys: Any = None  # [per_device] its keys


def _take(tree, i):
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), tree)


def _put(tree, i, value):
    return jax.tree.map(lambda x, v: jax.lax.dynamic_update_index_in_dim(x, v, i, 0), tree, value)


def _gather_sampled(local_clients, sampled, per_shard: int):
    """The clients at `sampled` (global ids, -1 = none) from a client-sharded state, each device
    getting its consecutive share: owners contribute, a reduce-scatter delivers."""
    local = sampled - jax.lax.axis_index(CLIENTS) * per_shard
    owned = (local >= 0) & (local < per_shard) & (sampled >= 0)
    picked = jax.tree.map(lambda x: x[jnp.clip(local, 0, per_shard - 1)], local_clients)
    contribution = jax.tree.map(
        lambda x: jnp.where(owned.reshape(-1, *([1] * (x.ndim - 1))), x, jnp.zeros_like(x)), picked
    )
    return jax.tree.map(_psum_scatter, contribution)


def _psum_scatter(x):
    if x.dtype == jnp.bool_:  # the collapse flags: a sum of one owner's flag and zeros
        return _psum_scatter(x.astype(jnp.int32)).astype(jnp.bool_)
    return jax.lax.psum_scatter(x, CLIENTS, scatter_dimension=0, tiled=True)


def _scatter_sampled(local_clients, sampled, trained, per_shard: int):
    """Writes the trained clients (this device's share) back to their owners' shards."""
    everyone = jax.tree.map(lambda x: jax.lax.all_gather(x, CLIENTS, tiled=True), trained)
    local = sampled - jax.lax.axis_index(CLIENTS) * per_shard
    owned = (local >= 0) & (local < per_shard) & (sampled >= 0)
    index = jnp.where(owned, local, per_shard)  # out of range: dropped
    return jax.tree.map(lambda x, v: x.at[index].set(v, mode='drop'), local_clients, everyone)


def _zero_metrics(n: int):
    return {
        k: jnp.zeros((n,), jnp.float32) for k in ('loss', 'correct', 'steps', 'flops', 'examples')
    }


def _squeeze(tree):
    """Drops the leading device axis of a per-device table inside `shard_map` (local size 1)."""
    return jax.tree.map(lambda x: x[0], tree)


def _unsqueeze(tree):
    return jax.tree.map(lambda x: x[None], tree)


class RoundRunner:
    """Runs the rounds and evaluations of an `algorithm.Algorithm` (SpaFL unless `algorithm` is
    given) with one execution strategy on one `clients` mesh.

    Build it with `make_round_runner`. `run_round(state, sampled, seed_key)` takes the host-side
    sampled ids; `evaluate(state)` returns every client's correct predictions, test counts and
    densities, replicated on every host. Every function compiles once: later rounds reuse it.
    `local_cfg` gives the batch schedule (batch size, epochs, drop_last), `round_cfg` the number
    of sampled clients and the aggregation weights.
    """

    def __init__(
        self,
        model: nn.Module,
        local_cfg: LocalConfig,
        round_cfg: RoundConfig,
        spec: DataSpec,
        train_data: ClientData,
        test_data: ClientData,
        *,
        strategy: str = 'auto',
        mesh: Mesh | None = None,
        lanes: int = 0,
        unroll: int = 1,
        eval_chunk: int = 32,
        eval_lanes: int = 0,
        macs=None,
        algorithm: algorithm_lib.Algorithm | None = None,
        cohort: bool = False,
    ):
        self.alg = (
            algorithm
            if algorithm is not None
            else federated.algorithm(model, local_cfg, round_cfg, macs)
        )
        self.model, self.local_cfg, self.round_cfg, self.spec = model, local_cfg, round_cfg, spec
        train_counts = np.asarray(jax.device_get(train_data.counts))
        test_counts = np.asarray(jax.device_get(test_data.counts))
        self.num_clients = len(train_counts)
        self.mesh = mesh if mesh is not None else make_mesh(self.num_clients)
        self.devices = self.mesh.devices.size
        # The client axis on the mesh, phantoms included (`make_mesh`).
        self.padded_clients = padded_count(self.num_clients, self.devices)
        self.per_shard = self.padded_clients // self.devices
        logging.info(
            '%d clients on %d devices: %d per device (%d phantom)',
            self.num_clients,
            self.devices,
            self.per_shard,
            self.padded_clients - self.num_clients,
        )
        self.strategy = resolve_client_execution(strategy, self.mesh.devices.flat[0].platform)
        self.unroll = max(int(unroll), 1)
        epochs = local_cfg.local_epochs
        self.steps_per_epoch = client_lib.steps_per_epoch(local_cfg, train_counts)
        self.stride = client_lib.steps_per_epoch(local_cfg, int(train_data.example_ids.shape[1]))
        self.per_device = -(-round_cfg.clients_per_round // self.devices)
        if self.strategy == 'vmap':
            self.lanes = self.per_device if lanes <= 0 else min(lanes, self.per_device)
        else:
            self.lanes = 1
        # The client axis of the state a round takes: every client (phantoms included), or with
        # `cohort` only the round's sampled clients, in the order of `RoundPlan.sampled` (each
        # device's share in its own shard), as a client store off the devices gathers them
        # (spafl_jax/store.py).
        self.cohort = bool(cohort)
        self.state_clients = self.devices * self.per_device if cohort else self.padded_clients
        slots = max_lane_steps(self.steps_per_epoch, epochs, self.per_device)
        self.max_slots = -(-slots // self.unroll) * self.unroll
        self.eval_chunk = max(int(eval_chunk), 1)
        # 'vmap': clients evaluated at once per device (0: as many as train at once).
        self.eval_lanes = self.lanes if eval_lanes <= 0 else int(eval_lanes)
        if self.alg.first_test_batch:  # no chunk straddles the first test batch's end
            self.eval_chunk = math.gcd(self.eval_chunk, self.alg.first_test_batch)

        self._replicated = NamedSharding(self.mesh, P())
        self._sharded = NamedSharding(self.mesh, P(CLIENTS))
        self.train_data = self._place_train(train_data)
        self.test_counts = np.pad(test_counts, (0, self.padded_clients - self.num_clients))
        self.test_data = self._place_test(test_data)
        self._eval_table = None
        self._panel_tables = {}
        self.traces: dict[str, int] = {}
        self._build()

    # -- placement ------------------------------------------------------------------------------

    def _global(self, value, sharding):
        """A global array from a value every process holds in full (same seed, same data)."""
        if jax.process_count() == 1:
            return jax.device_put(value, sharding)
        value = np.asarray(jax.device_get(value))
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    def _place_train(self, data: ClientData) -> ClientData:
        """The pooled images and labels on every device; each client's example ids and count
        only on the device that holds the client (a round gathers the sampled clients' rows, as it
        gathers their states), so 10^6 clients' ids are not copied to every device."""
        phantoms = self.padded_clients - self.num_clients
        ids = np.pad(np.asarray(jax.device_get(data.example_ids)), ((0, phantoms), (0, 0)))
        counts = np.pad(np.asarray(jax.device_get(data.counts)), (0, phantoms))
        return ClientData(
            images=self._global(data.images, self._replicated),
            labels=self._global(data.labels, self._replicated),
            example_ids=self._global(ids, self._sharded),
            counts=self._global(counts, self._sharded),
        )

    def _place_test(self, data: ClientData) -> ClientData:
        # Each device evaluates its own block of clients: their test ids travel with them, padded to a
        # whole number of evaluation chunks.
        # Phantom clients have no test examples.
        ids = np.asarray(jax.device_get(data.example_ids))
        width = max(-(-ids.shape[1] // self.eval_chunk), 1) * self.eval_chunk
        phantoms = self.padded_clients - ids.shape[0]
        ids = np.pad(ids, ((0, phantoms), (0, width - ids.shape[1])))
        counts = np.pad(np.asarray(jax.device_get(data.counts)), (0, phantoms))
        self._test_ids = ids  # a host copy: `evaluate_clients` takes any clients' rows of it
        return ClientData(
            images=self._global(data.images, self._replicated),
            labels=self._global(data.labels, self._replicated),
            example_ids=self._global(ids, self._sharded),
            counts=self._global(counts, self._sharded),
        )

    @property
    def replicated(self) -> NamedSharding:
        """The sharding of what every device holds whole (the server's part of a state)."""
        return self._replicated

    def state_sharding(self, state):
        """Client axis sharded over the mesh; the server's part and the round replicated."""
        return jax.tree.map(lambda _: self._replicated, state).replace(
            clients=jax.tree.map(lambda _: self._sharded, state.clients)
        )

    def place_state(self, state):
        """`state` laid out on the mesh, its client axis padded with phantoms (a no-op when it
        already is)."""
        leaves = jax.tree.leaves(state.clients)
        if leaves and leaves[0].shape[0] != self.state_clients:
            state = state.replace(clients=pad_clients(state.clients, self.state_clients))
        target = self.state_sharding(state)
        if all(
            getattr(x, 'sharding', None) == s
            for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(target))
        ):
            return state
        return jax.tree.map(self._global, state, target)

    # -- the device programs, written for one device's shard ------------------------------------

    def _shard_map(self, fn, in_specs, out_specs):
        """`fn` on each device's shard; each trace of it is counted (see `trace_counts`)."""
        name = fn.__name__

        @functools.wraps(fn)
        def counted(*args):
            self.traces[name] = self.traces.get(name, 0) + 1
            return fn(*args)

        return jax.shard_map(
            counted, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )

    def _jit(self, fn, **kwargs):
        """`jax.jit` with the compiler options measured fastest for the model (`hardware.jit`)."""
        return hardware.jit(fn, model=self.model, **kwargs)

    def _where(self, sampled):
        """Where the `sampled` clients (global ids, -1 = none) sit on the state's client axis."""
        if not self.cohort:
            return sampled
        return jnp.where(sampled >= 0, jnp.arange(sampled.shape[0], dtype=sampled.dtype), -1)

    def _state_shard(self) -> int:
        return self.state_clients // self.devices

    def _begin(self, state, data: ClientData, sampled, seed_key):
        """Gathers this device's clients, starts them, draws their schedules (steps 1-2)."""
        cfg = self.local_cfg
        clients = _gather_sampled(state.clients, self._where(sampled), self._state_shard())
        d = jax.lax.axis_index(CLIENTS)
        mine = jax.lax.dynamic_slice_in_dim(sampled, d * self.per_device, self.per_device)
        real = mine >= 0
        ids = jnp.maximum(mine, 0)
        keys = algorithm_lib.client_keys(seed_key, state.round, ids)
        clients, opt_state = algorithm_lib.start_clients(self.alg, state, clients, keys)
        # The sampled clients' example ids, from the devices that hold them.
        own_counts, example_ids = _gather_sampled(
            (data.counts, data.example_ids), sampled, self.per_shard
        )
        counts = jnp.where(real, own_counts, 0)
        max_count = example_ids.shape[1]

        def schedule(key, count, example_ids):
            batches, _, step_keys = client_lib.local_schedule(cfg, key, count, max_count)
            return (
                client_lib.example_ids_of(example_ids, batches),
                step_keys,
                client_lib.example_mask(cfg, batches, count),
            )

        batch_ids, step_keys, batch_mask = jax.vmap(schedule)(keys, counts, example_ids)
        weights = algorithm_lib.aggregation_weights(
            self.alg.aggregation or self.round_cfg.aggregation, counts, real
        )
        final_ids = final_keys = None
        if self.alg.client_final is not None:
            final_ids, final_keys = jax.vmap(
                lambda k, c, e: algorithm_lib.final_batch(cfg, k, c, e)
            )(keys, counts, example_ids)
        return RoundWork(
            clients=clients,
            opt_state=opt_state,
            metrics=_zero_metrics(self.per_device),
            batch_ids=batch_ids,
            batch_mask=batch_mask,
            step_keys=step_keys,
            steps_per_epoch=client_lib.steps_per_epoch(cfg, counts),
            weights=weights,
            final_ids=final_ids,
            final_keys=final_keys,
        )

    def _step(
        self, work: RoundWork, data: ClientData, client, opt_state, position, k, valid, constants
    ):
        """`Algorithm.client_step` on step k of the schedule of the client at `position`."""
        ids = work.batch_ids[position, k]
        x = client_lib.preprocess(self.spec, data.images[ids], work.step_keys[position, k])
        mask = None if work.batch_mask is None else work.batch_mask[position, k]
        return algorithm_lib.masked_step(
            self.alg,
            client,
            opt_state,
            x,
            data.labels[ids],
            mask,
            constants,
            work.step_keys[position, k],
            valid,
        )

    def _map_clients(self, work: RoundWork, data, constants) -> RoundWork:
        """'map': this device's clients one after the other, each for exactly its real steps
        (`client.real_steps`: no padded steps, one program per round)."""

        def one_client(i, work):
            def body(carry, k):
                client, opt_state = carry
                c, o, m = self._step(
                    work, data, client, opt_state, i, k, jnp.bool_(True), constants
                )
                return (c, o), m

            (client, opt_state), metrics = client_lib.real_steps(
                self.local_cfg,
                body,
                (_take(work.clients, i), _take(work.opt_state, i)),
                work.steps_per_epoch[i],
                self.stride,
                self.unroll,
            )
            return work.replace(
                clients=_put(work.clients, i, client),
                opt_state=_put(work.opt_state, i, opt_state),
                metrics=_put(work.metrics, i, metrics),
            )

        return jax.lax.fori_loop(0, self.per_device, one_client, work)

    def _vmap_slots(
        self, work: RoundWork, data, positions, steps, valid, slots, constants
    ) -> RoundWork:
        """'vmap': all lanes step together, `slots` times; lane l steps client positions[t, l]."""
        u = self.unroll
        direct = self.lanes == self.per_device  # lane l is client l: no gather, no scatter

        def slot(t, work):
            if direct:
                c, o, m = jax.vmap(
                    lambda c, o, p, k, ok: self._step(work, data, c, o, p, k, ok, constants)
                )(work.clients, work.opt_state, jnp.arange(self.per_device), steps[t], valid[t])
                return work.replace(
                    clients=c, opt_state=o, metrics=jax.tree.map(jnp.add, work.metrics, m)
                )
            pos = positions[t]
            take = lambda tree: jax.tree.map(lambda x: x[pos], tree)
            c, o, m = jax.vmap(
                lambda c, o, p, k, ok: self._step(work, data, c, o, p, k, ok, constants)
            )(take(work.clients), take(work.opt_state), pos, steps[t], valid[t])
            put = lambda tree, v: jax.tree.map(lambda x, y: x.at[pos].set(y), tree, v)
            return work.replace(
                clients=put(work.clients, c),
                opt_state=put(work.opt_state, o),
                metrics=jax.tree.map(lambda a, v: a.at[pos].add(v), work.metrics, m),
            )

        def unrolled(i, work):
            for j in range(u):
                work = slot(i * u + j, work)
            return work

        return jax.lax.fori_loop(0, (slots + u - 1) // u, unrolled, work)

    def _finish(self, state, work: RoundWork, data: ClientData, sampled, executed):
        """The clients end, the server averages (in client-id order) and updates (steps 3-4)."""
        real = (work.steps_per_epoch > 0).astype(jnp.float32)
        clients, m = work.clients, work.metrics
        if self.alg.client_final is not None:
            clients, final = algorithm_lib.finish_clients(
                self.alg,
                self.spec,
                clients,
                work.opt_state,
                self.alg.round_constants(state),
                data.images,
                data.labels,
                work.final_ids,
                work.final_keys,
            )
            m = jax.tree.map(lambda a, b: a + real * b, m, final)
        order = algorithm_lib.client_order(
            sampled, min(self.round_cfg.clients_per_round, sampled.shape[0])
        )
        new_state = algorithm_lib.end_round(
            self.alg,
            state,
            clients,
            work.opt_state,
            work.weights,
            lambda everyone, stored: _scatter_sampled(
                everyone, self._where(sampled), stored, self._state_shard()
            ),
            order,
            axis_name=CLIENTS,
        )
        # Every client's sums, gathered and added in client-id order: the same on any mesh.
        per_client = jax.lax.all_gather({**m, 'real': real}, CLIENTS, tiled=True)
        metrics = algorithm_lib.round_metrics(algorithm_lib.take(per_client, order), executed)
        return new_state, metrics

    def _build(self):
        rep, shd = P(), P(CLIENTS)
        state_specs = algorithm_lib.state_specs(self.alg, shd, rep)
        data_specs = ClientData(images=rep, labels=rep, example_ids=shd, counts=shd)

        def whole(state, data, sampled, seed_key, positions, steps, valid, slots, executed):
            work = self._begin(state, data, sampled, seed_key)
            constants = self.alg.round_constants(state)
            if self.strategy == 'map':
                work = self._map_clients(work, data, constants)
            else:
                work = self._vmap_slots(
                    work, data, positions[0], steps[0], valid[0], slots[0], constants
                )
            return self._finish(state, work, data, sampled, executed)

        self._round_fn = self._jit(
            self._shard_map(
                whole,
                (state_specs, data_specs, rep, rep, shd, shd, shd, shd, rep),
                (state_specs, rep),
            ),
            donate_argnums=(0,),
        )

        test_specs = ClientData(images=rep, labels=rep, example_ids=shd, counts=shd)
        self._eval_fn = self._jit(
            self._shard_map(self._evaluate_local, (state_specs, test_specs), rep)
        )

        # Any stack of clients with its own test rows (`evaluate_clients`): compiled per stack size.
        self._clients_eval_fn = self._jit(
            self._shard_map(self._evaluate_local, (state_specs, test_specs), rep)
        )

        def tested(state, data):
            return self.alg.tested(state, state.clients, data.counts)

        self._tested_fn = self._jit(self._shard_map(tested, (state_specs, test_specs), shd))

        def evaluate_panel(state, data, table):
            # Each device tests the panel's clients it holds, read in place one at a time (no
            # gathered copy of the panel's states); -1 marks an empty position.
            local = table[0]
            batch = self.eval_lanes if self.strategy == 'vmap' else None

            def one(i):
                client = _take(state.clients, jnp.maximum(i, 0))
                count = jnp.where(i >= 0, data.counts[jnp.maximum(i, 0)], 0)
                correct = self._eval_client(
                    state, client, data, data.example_ids[jnp.maximum(i, 0)], count
                )
                stats = self.alg.eval_density(state, _unsqueeze(client), count[None])
                return {'correct': correct, 'counts': count, **_squeeze(stats)}

            out = jax.lax.map(one, local, batch_size=batch)
            return jax.tree.map(lambda x: jax.lax.all_gather(x, CLIENTS, tiled=True), out)

        self._panel_fn = self._jit(
            self._shard_map(evaluate_panel, (state_specs, test_specs, shd), rep)
        )

    # -- evaluation -----------------------------------------------------------------------------

    def _eval_client(self, state, client, data, example_ids, count):
        return algorithm_lib.evaluate_client(
            self.alg,
            self.spec,
            state,
            client,
            data.images,
            data.labels,
            example_ids,
            count,
            batch_size=self.eval_chunk,
        )

    def _evaluate_local(self, state, data):
        one = lambda a: self._eval_client(state, a[0], data, a[1], a[2])
        # 'vmap' evaluates `lanes` clients at once (all of a device's clients at once would hold
        # every client's activations: 16 GB for Conv4 at 100 clients).
        batch = self.eval_lanes if self.strategy == 'vmap' else None
        correct = jax.lax.map(one, (state.clients, data.example_ids, data.counts), batch_size=batch)
        return self._eval_outputs(state, correct, data)

    def _eval_outputs(self, state, correct, data):
        stats = self.alg.eval_density(state, state.clients, data.counts)
        local = {'correct': correct, 'counts': data.counts, **stats}
        return jax.tree.map(lambda x: jax.lax.all_gather(x, CLIENTS, tiled=True), local)

    # -- the public calls -----------------------------------------------------------------------

    def trace_counts(self) -> dict[str, int]:
        """How many times each device program was traced so far: 1 each, whatever the number of
        rounds, since nothing is traced (or compiled) again after the first round."""
        return dict(self.traces)

    def plan(self, sampled: np.ndarray) -> RoundPlan:
        return plan_round(
            np.asarray(sampled),
            self.steps_per_epoch,
            epochs=self.local_cfg.local_epochs,
            stride=self.stride,
            devices=self.devices,
            lanes=self.lanes,
            max_slots=self.max_slots,
        )

    def run_round(self, state, sampled: np.ndarray, seed_key: jax.Array):
        """One round of the algorithm for the host-side `sampled` client ids -> (new state,
        metrics). The state passed in is donated (its buffers become the new state's): do not read
        it afterwards.

        Nothing waits for the device inside: the plan is host arithmetic on start-up counts, and the
        steps are dispatched asynchronously.
        """
        state = self.place_state(state)
        plan = self.plan(sampled)
        replicated = lambda x: self._global(x, self._replicated)
        sampled_dev = replicated(plan.sampled)
        key = jax.random.wrap_key_data(
            replicated(jax.random.key_data(seed_key)), impl=jax.random.key_impl(seed_key)
        )
        executed = replicated(np.int32(plan.executed_steps()))
        return self._round_fn(*self._round_args(state, plan, sampled_dev, key, executed))

    def _round_args(self, state, plan: RoundPlan, sampled, key, executed) -> tuple:
        """The arguments of the compiled round for `plan`."""
        sharded = lambda x: self._global(x, self._sharded)
        tables = tuple(sharded(x) for x in (plan.positions, plan.steps, plan.valid))
        return (state, self.train_data, sampled, key, *tables, sharded(plan.slots), executed)

    def export(self, state, sampled: np.ndarray, seed_key: jax.Array, platforms=('cuda', 'tpu')):
        """The round and the evaluation as `jax.export.Exported` programs for `platforms`, lowered
        on this machine: a change that breaks lowering for an accelerator fails here, on a CPU.
        Nothing runs and the state is not donated."""
        state = self.place_state(state)
        plan = self.plan(sampled)
        replicated = lambda x: self._global(x, self._replicated)
        key = jax.random.wrap_key_data(
            replicated(jax.random.key_data(seed_key)), impl=jax.random.key_impl(seed_key)
        )
        executed = replicated(np.int32(plan.executed_steps()))
        args = self._round_args(state, plan, replicated(plan.sampled), key, executed)
        lower = lambda fn: jax.export.export(fn, platforms=tuple(platforms))
        return {
            'round': lower(self._round_fn)(*args),
            'evaluate': lower(self._eval_fn)(state, self.test_data),
        }

    def unpadded(self, state):
        """`state` without its phantom clients: what is saved, exported and drawn."""
        return state.replace(clients=jax.tree.map(lambda x: x[: self.num_clients], state.clients))

    def tested_state(self, state):
        """`state` as testing every client leaves it (`Algorithm.tested`): the same state unless a
        test changes the clients (SpaFL's official collapse check, `federated.test_thresholds`)."""
        if self.alg.tested is algorithm_lib.unchanged:
            return state
        state = self.place_state(state)
        return state.replace(clients=self._tested_fn(state, self.test_data))

    def panel_table(self, panel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each device finds the clients of `panel` it holds: ([devices, width] indices into
        its shard, -1 padded; the position of each panel client in the flattened table)."""
        panel = np.asarray(panel, np.int64)
        owner = panel // self.per_shard
        width = max(int(np.bincount(owner, minlength=self.devices).max()), 1)
        table = np.full((self.devices, width), -1, np.int32)
        where = np.empty(len(panel), np.int64)
        for d in range(self.devices):
            mine = np.flatnonzero(owner == d)
            table[d, : len(mine)] = panel[mine] - d * self.per_shard
            where[mine] = d * width + np.arange(len(mine))
        return table, where

    def evaluate_panel(self, state, panel: np.ndarray) -> dict:
        """`evaluate` of the clients `panel` only: the arrays are `[len(panel), ...]`, in its order.

        The work is the panel's, whatever the number of clients: a fixed panel every round and a
        full sweep now and then is how a million clients are evaluated (`config.eval_panel`). The
        state is not changed: an algorithm whose test changes the clients is evaluated in full.
        """
        state = self.place_state(state)
        key = tuple(np.asarray(panel).tolist())
        if self._panel_tables.get('key') != key:
            table, where = self.panel_table(panel)
            self._panel_tables = {
                'key': key,
                'table': self._global(table, self._sharded),
                'where': where,
            }
        out = self._panel_fn(state, self.test_data, self._panel_tables['table'])
        return jax.tree.map(lambda x: x[self._panel_tables['where']], out)

    def evaluate_clients(self, state, ids: np.ndarray) -> dict:
        """`evaluate` of an explicit stack of clients: `state.clients` holds `len(ids)` of them (a
        multiple of the device count, device d's share in its shard), whose global ids are `ids`
        (-1: an empty position, left out of the result). A client store off the devices evaluates
        its clients this way, a chunk at a time; an algorithm whose test changes the clients
        cannot be evaluated so (its clients are evaluated in place, `evaluate`)."""
        if self.alg.tested is not algorithm_lib.unchanged:
            raise ValueError(
                f"{self.alg.name}: testing changes its clients (collapse_check='previous'), so "
                'they are evaluated in place with `evaluate`, not as a stack.'
            )
        ids = np.asarray(ids, np.int64)
        if len(ids) % self.devices:
            raise ValueError(f'{len(ids)} clients do not split over {self.devices} devices.')
        real = ids >= 0
        safe = np.where(real, ids, 0)
        data = ClientData(
            images=self.test_data.images,
            labels=self.test_data.labels,
            example_ids=self._global(self._test_ids[safe], self._sharded),
            counts=self._global(
                np.where(real, self.test_counts[safe], 0).astype(np.int32), self._sharded
            ),
        )
        state = jax.tree.map(self._global, state, self.state_sharding(state))
        out = self._clients_eval_fn(state, data)
        return jax.tree.map(lambda x: x[np.flatnonzero(real)], out)

    def evaluate(self, state) -> dict:
        """Per-client correct predictions, test counts and densities, each `[num_clients, ...]`."""
        state = self.place_state(state)
        real = lambda out: jax.tree.map(lambda x: x[: self.num_clients], out)  # no phantoms
        return real(self._eval_fn(state, self.test_data))


def make_round_runner(
    config,
    model: nn.Module,
    *,
    local_cfg: LocalConfig,
    round_cfg: RoundConfig,
    spec: DataSpec,
    train_data: ClientData,
    test_data: ClientData,
    macs=None,
    algorithm: algorithm_lib.Algorithm | None = None,
) -> RoundRunner:
    """The runner a config asks for (strategy, lanes, unroll, evaluation chunk) of `algorithm`
    (SpaFL's by default)."""
    return RoundRunner(
        model,
        local_cfg,
        round_cfg,
        spec,
        train_data,
        test_data,
        **runner_options(config),
        macs=macs,
        algorithm=algorithm,
    )


def runner_options(config) -> dict[str, Any]:
    """The `RoundRunner` arguments a config gives: strategy, lanes, unroll, evaluation chunks."""
    return {
        'strategy': config.client_execution,
        'lanes': config.vmap_lanes,
        'unroll': config.scan_unroll,
        'eval_chunk': config.eval_chunk,
        'eval_lanes': config.eval_lanes,
    }


def make_round_functions(
    config,
    method,
    model: nn.Module,
    *,
    local_cfg: LocalConfig,
    round_cfg: RoundConfig,
    spec: DataSpec,
    train_data: ClientData,
    test_data: ClientData,
    macs=None,
):
    """`(round_fn, eval_fn)` for the runner: `round_fn(state, train_data, sampled, seed_key)` and
    `eval_fn(state, test_data) -> (state, evaluation)`, the method's algorithm on a `RoundRunner`
    (its data placed once, at construction, so the data arguments are ignored)."""
    runner = make_round_runner(
        config,
        model,
        local_cfg=local_cfg,
        round_cfg=round_cfg,
        spec=spec,
        train_data=train_data,
        test_data=test_data,
        macs=macs,
        algorithm=method.algorithm(model, local_cfg, round_cfg, macs),
    )

    def round_fn(state, data, sampled, seed_key):
        del data  # placed on the mesh once, at construction
        return runner.run_round(state, np.asarray(sampled), seed_key)

    def eval_fn(state, data, panel=None):
        """Every client (and the state as the test leaves it), or the clients `panel` only."""
        del data
        if panel is not None:
            return state, runner.evaluate_panel(state, panel)
        return runner.tested_state(state), runner.evaluate(state)

    round_fn.runner = eval_fn.runner = runner
    return round_fn, eval_fn
