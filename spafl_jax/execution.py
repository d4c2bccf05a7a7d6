"""How a round's client work reaches the hardware: execution strategies over the client axis, the
`RoundRunner`, which `backends.DeviceBackend` and the client stores drive.

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

import functools
import math

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from spafl_jax import algorithm as algorithm_lib
from spafl_jax import client as client_lib
from spafl_jax import federated
from spafl_jax import hardware
from spafl_jax import mesh as mesh_lib
from spafl_jax import strategies
from spafl_jax.client import DataSpec, LocalConfig
from spafl_jax.federated import ClientData, RoundConfig
from spafl_jax.strategies import RoundWork
from spafl_jax.runner_evaluation import RunnerEvaluation

# Re-exported: the mesh (`mesh`), the round plan (`planning`), the runtime set-up and the strategy
# choice (`hardware`) have their own modules.
from spafl_jax.mesh import CLIENTS, create_sharded, make_mesh, pad_clients, padded_count  # noqa: F401
from spafl_jax.planning import RoundPlan, max_lane_steps, plan_round  # noqa: F401
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


def _zero_metrics(n: int):
    return {
        k: jnp.zeros((n,), jnp.float32) for k in ('loss', 'correct', 'steps', 'flops', 'examples')
    }


class RoundRunner:
    """Runs the rounds and evaluations of an `algorithm.Algorithm` (SpaFL unless `algorithm` is
    given) with one execution strategy on one `clients` mesh.

    `run_round(state, sampled, seed_key)` takes the host-side
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
        self.traces: dict[str, int] = {}
        self._build()
        self.evaluation = RunnerEvaluation(self)

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
        clients = mesh_lib.gather_sampled(state.clients, self._where(sampled), self._state_shard())
        d = jax.lax.axis_index(CLIENTS)
        mine = jax.lax.dynamic_slice_in_dim(sampled, d * self.per_device, self.per_device)
        real = mine >= 0
        ids = jnp.maximum(mine, 0)
        keys = algorithm_lib.client_keys(seed_key, state.round, ids)
        clients, opt_state = algorithm_lib.start_clients(self.alg, state, clients, keys)
        # The sampled clients' example ids, from the devices that hold them.
        own_counts, example_ids = mesh_lib.gather_sampled(
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
            lambda everyone, stored: mesh_lib.scatter_sampled(
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
            step = lambda c, o, p, k, ok: self._step(work, data, c, o, p, k, ok, constants)
            if self.strategy == 'map':
                work = strategies.map_clients(work, step, self.local_cfg, self.stride, self.unroll)
            else:
                lanes = (positions[0], steps[0], valid[0], slots[0])
                work = strategies.vmap_slots(work, step, *lanes, self.unroll)
            return self._finish(state, work, data, sampled, executed)

        self._round_fn = self._jit(
            self._shard_map(
                whole,
                (state_specs, data_specs, rep, rep, shd, shd, shd, shd, rep),
                (state_specs, rep),
            ),
            donate_argnums=(0,),
        )

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
            'evaluate': lower(self.evaluation._eval_fn)(state, self.test_data),
        }

    def tested_state(self, state):
        """`state` as testing every client leaves it (`RunnerEvaluation.tested_state`)."""
        return self.evaluation.tested_state(state)

    def evaluate(self, state) -> dict:
        """Per-client correct predictions, test counts and densities, each `[num_clients, ...]`."""
        return self.evaluation.evaluate(state)

    def evaluate_panel(self, state, panel: np.ndarray) -> dict:
        """`evaluate` of the clients `panel` only (`RunnerEvaluation.evaluate_panel`)."""
        return self.evaluation.evaluate_panel(state, panel)

    def evaluate_clients(self, state, ids: np.ndarray) -> dict:
        """`evaluate` of an explicit stack of clients (`RunnerEvaluation.evaluate_clients`)."""
        return self.evaluation.evaluate_clients(state, ids)

    def unpadded(self, state):
        """`state` without its phantom clients: what is saved, exported and drawn."""
        return state.replace(clients=jax.tree.map(lambda x: x[: self.num_clients], state.clients))
