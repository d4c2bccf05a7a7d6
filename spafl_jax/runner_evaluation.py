"""The runner's evaluation: every client, a fixed panel, or any stack of clients, each on its own
test split, on the `clients` mesh (each device tests the clients it holds, one client at a time
under 'map', `eval_lanes` at a time under 'vmap'), with `algorithm.evaluate_client`, the one
per-client evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from spafl_jax import algorithm as algorithm_lib
from spafl_jax.federated import ClientData
from spafl_jax.mesh import CLIENTS
from spafl_jax.strategies import take


def _squeeze(tree):
    """Drops the leading axis of a one-client stack."""
    return jax.tree.map(lambda x: x[0], tree)


def _unsqueeze(tree):
    return jax.tree.map(lambda x: x[None], tree)


class RunnerEvaluation:
    """The evaluations of an `execution.RoundRunner` (its mesh, data placement and strategy); built
    by the runner, reached through its `evaluate`, `evaluate_panel`, `evaluate_clients` and
    `tested_state`."""

    def __init__(self, runner):
        self.runner = runner
        self._eval_table = None
        self._panel_tables = {}
        rep, shd = P(), P(CLIENTS)
        state_specs = algorithm_lib.state_specs(runner.alg, shd, rep)
        test_specs = ClientData(images=rep, labels=rep, example_ids=shd, counts=shd)
        self._eval_fn = runner._jit(
            runner._shard_map(self._evaluate_local, (state_specs, test_specs), rep)
        )

        # Any stack of clients with its own test rows (`evaluate_clients`): compiled per stack size.
        self._clients_eval_fn = runner._jit(
            runner._shard_map(self._evaluate_local, (state_specs, test_specs), rep)
        )

        def tested(state, data):
            return runner.alg.tested(state, state.clients, data.counts)

        self._tested_fn = runner._jit(runner._shard_map(tested, (state_specs, test_specs), shd))

        def evaluate_panel(state, data, table):
            # Each device tests the panel's clients it holds, read in place one at a time (no
            # gathered copy of the panel's states); -1 marks an empty position.
            local = table[0]
            batch = runner.eval_lanes if runner.strategy == 'vmap' else None

            def one(i):
                client = take(state.clients, jnp.maximum(i, 0))
                count = jnp.where(i >= 0, data.counts[jnp.maximum(i, 0)], 0)
                correct = self._eval_client(
                    state, client, data, data.example_ids[jnp.maximum(i, 0)], count
                )
                stats = runner.alg.eval_density(state, _unsqueeze(client), count[None])
                return {'correct': correct, 'counts': count, **_squeeze(stats)}

            out = jax.lax.map(one, local, batch_size=batch)
            return jax.tree.map(lambda x: jax.lax.all_gather(x, CLIENTS, tiled=True), out)

        self._panel_fn = runner._jit(
            runner._shard_map(evaluate_panel, (state_specs, test_specs, shd), rep)
        )

    def _eval_client(self, state, client, data, example_ids, count):
        return algorithm_lib.evaluate_client(
            self.runner.alg,
            self.runner.spec,
            state,
            client,
            data.images,
            data.labels,
            example_ids,
            count,
            batch_size=self.runner.eval_chunk,
        )

    def _evaluate_local(self, state, data):
        one = lambda a: self._eval_client(state, a[0], data, a[1], a[2])
        # 'vmap' evaluates `lanes` clients at once (all of a device's clients at once would hold
        # every client's activations: 16 GB for Conv4 at 100 clients).
        batch = self.runner.eval_lanes if self.runner.strategy == 'vmap' else None
        correct = jax.lax.map(one, (state.clients, data.example_ids, data.counts), batch_size=batch)
        return self._eval_outputs(state, correct, data)

    def _eval_outputs(self, state, correct, data):
        stats = self.runner.alg.eval_density(state, state.clients, data.counts)
        local = {'correct': correct, 'counts': data.counts, **stats}
        return jax.tree.map(lambda x: jax.lax.all_gather(x, CLIENTS, tiled=True), local)

    def tested_state(self, state):
        """`state` as testing every client leaves it (`Algorithm.tested`): the same state unless a
        test changes the clients (SpaFL's official collapse check, `federated.test_thresholds`)."""
        if self.runner.alg.tested is algorithm_lib.unchanged:
            return state
        state = self.runner.place_state(state)
        return state.replace(clients=self._tested_fn(state, self.runner.test_data))

    def panel_table(self, panel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each device finds the clients of `panel` it holds: ([devices, width] indices into
        its shard, -1 padded; the position of each panel client in the flattened table)."""
        panel = np.asarray(panel, np.int64)
        owner = panel // self.runner.per_shard
        width = max(int(np.bincount(owner, minlength=self.runner.devices).max()), 1)
        table = np.full((self.runner.devices, width), -1, np.int32)
        where = np.empty(len(panel), np.int64)
        for d in range(self.runner.devices):
            mine = np.flatnonzero(owner == d)
            table[d, : len(mine)] = panel[mine] - d * self.runner.per_shard
            where[mine] = d * width + np.arange(len(mine))
        return table, where

    def evaluate_panel(self, state, panel: np.ndarray) -> dict:
        """`evaluate` of the clients `panel` only: the arrays are `[len(panel), ...]`, in its order.

        The work is the panel's, whatever the number of clients: a fixed panel every round and a
        full sweep now and then is how a million clients are evaluated (`config.eval_panel`). The
        state is not changed: an algorithm whose test changes the clients is evaluated in full.
        """
        state = self.runner.place_state(state)
        key = tuple(np.asarray(panel).tolist())
        if self._panel_tables.get('key') != key:
            table, where = self.panel_table(panel)
            self._panel_tables = {
                'key': key,
                'table': self.runner._global(table, self.runner._sharded),
                'where': where,
            }
        out = self._panel_fn(state, self.runner.test_data, self._panel_tables['table'])
        return jax.tree.map(lambda x: x[self._panel_tables['where']], out)

    def evaluate_clients(self, state, ids: np.ndarray) -> dict:
        """`evaluate` of an explicit stack of clients: `state.clients` holds `len(ids)` of them (a
        multiple of the device count, device d's share in its shard), whose global ids are `ids`
        (-1: an empty position, left out of the result). A client store off the devices evaluates
        its clients this way, a chunk at a time; an algorithm whose test changes the clients
        cannot be evaluated so (its clients are evaluated in place, `evaluate`)."""
        if self.runner.alg.tested is not algorithm_lib.unchanged:
            raise ValueError(
                f"{self.runner.alg.name}: testing changes its clients (collapse_check='previous'), so "
                'they are evaluated in place with `evaluate`, not as a stack.'
            )
        ids = np.asarray(ids, np.int64)
        if len(ids) % self.runner.devices:
            raise ValueError(f'{len(ids)} clients do not split over {self.runner.devices} devices.')
        real = ids >= 0
        safe = np.where(real, ids, 0)
        data = ClientData(
            images=self.runner.test_data.images,
            labels=self.runner.test_data.labels,
            example_ids=self.runner._global(self.runner._test_ids[safe], self.runner._sharded),
            counts=self.runner._global(
                np.where(real, self.runner.test_counts[safe], 0).astype(np.int32),
                self.runner._sharded,
            ),
        )
        state = jax.tree.map(self.runner._global, state, self.runner.state_sharding(state))
        out = self._clients_eval_fn(state, data)
        return jax.tree.map(lambda x: x[np.flatnonzero(real)], out)

    def evaluate(self, state) -> dict:
        """Per-client correct predictions, test counts and densities, each `[num_clients, ...]`."""
        state = self.runner.place_state(state)
        real = lambda out: jax.tree.map(lambda x: x[: self.runner.num_clients], out)  # no phantoms
        return real(self._eval_fn(state, self.runner.test_data))
