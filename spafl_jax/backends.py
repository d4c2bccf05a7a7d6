"""Where the clients' models live during a run, behind the one interface the training loop drives.

- `DeviceBackend`: every client on the devices, sharded over the `clients` mesh
  (`execution.RoundRunner`); the default while the clients fit.
- `StoreBackend`: the clients in a host or disk store, the sampled cohort read and written each
  round (`store.StoreRunner`); SpaFL with the lazy importance update.

Both compute the same bits (tests/test_store.py); `train.train_and_evaluate` does not know which it
drives. `settings` is the run's validated config. A backend is built in two steps: its
`first_client` (one client's variables: what the model's MACs and the bit counts are read from)
before anything compiles, then `build(macs)`.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from spafl_jax import client as client_lib
from spafl_jax import execution
from spafl_jax import federated
from spafl_jax import masking
from spafl_jax import store as store_lib


@jax.jit
def first_layer_masks(params, thresholds) -> jax.Array:
    """[clients, rows] kept rows of every client's first masked layer (1 kept, 0 pruned), as the
    evaluated model uses them (collapsed layers reset)."""
    thresholds = jax.vmap(masking.reset_collapsed_thresholds)(params, thresholds)
    kernel = jax.tree.leaves(masking.kernels_of(params, thresholds))[0]
    threshold = jax.tree.leaves(thresholds)[0]
    return jax.vmap(masking.hard_row_mask)(kernel, threshold).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def finite_report(method, state, sampled):
    """Which parts are finite. Only sampled clients trained; the rest changed by the finite delta."""

    def all_finite(tree):
        return jnp.all(
            jnp.stack([jnp.array(True)] + [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])
        )

    if isinstance(state.clients, client_lib.ClientState):  # SpaFL, Local: the stored clients,
        # (weights and pending shifts) of the sampled ones only, not every client's weights
        own = jax.tree.map(lambda x: x[sampled], state.clients)
        params, thresholds, batch_stats = (own.params, own.shifts), own.thresholds, own.batch_stats
    else:
        params, thresholds, batch_stats = jax.tree.map(
            lambda x: x[sampled], method.client_variables(state)
        )
    server = (state.server_thresholds, state.last_delta) if method.communicates_thresholds else ()
    return {
        'weights': all_finite(params),
        'batch_stats': all_finite(batch_stats),
        'thresholds': all_finite((thresholds, server)),
    }


def runner_options(settings) -> dict:
    """The `execution.RoundRunner` arguments of a run's settings: strategy, lanes, unroll,
    evaluation chunks."""
    return {
        'strategy': settings.client_execution,
        'lanes': settings.vmap_lanes,
        'unroll': settings.scan_unroll,
        'eval_chunk': settings.eval_chunk,
        'eval_lanes': settings.eval_lanes,
    }


def _one_client(tree):
    return jax.tree.map(lambda x: x[0], tree)


class _Backend:
    """What both backends do alike; the store's checkpoints also take its files along."""

    runner: execution.RoundRunner

    def saved_state(self, state, digest: bool):
        """What a checkpoint holds of `state`: host arrays without phantoms with the digest."""
        return self.runner.unpadded(execution.host_local(state)) if digest else state

    def rollback(self, rounds_done: int) -> int:
        """Takes what lives outside the checkpoint back to `rounds_done`; how many writes."""
        del rounds_done  # the device state is the checkpoint's: nothing else to take back
        return 0

    def flush(self) -> None:
        pass

    def committed(self, steps: list[int]) -> None:
        del steps

    def close(self) -> None:
        pass


class DeviceBackend(_Backend):
    """Every client on the devices: the state is created there, sharded, and never leaves."""

    writes_final_state = True  # final_state.msgpack holds every client

    def __init__(self, run, settings):
        self.run, self.settings = run, settings
        # Each device creates its own clients (padded with phantoms, sharded).
        self.state = execution.create_sharded(run.initial_state, settings.num_clients)
        params, thresholds, batch_stats = run.method.client_variables(self.state)
        self.first_client = _one_client(
            client_lib.ClientState(
                params=params, thresholds=thresholds, batch_stats=batch_stats, opt_state=()
            )
        )

    def build(self, macs) -> None:
        run = self.run
        self.runner = execution.RoundRunner(
            run.model,
            run.local_cfg,
            run.round_cfg,
            run.spec,
            run.train_data,
            run.test_data,
            **runner_options(self.settings),
            macs=macs,
            algorithm=run.method.algorithm(run.model, run.local_cfg, run.round_cfg, macs),
        )

    def checkpoint_target(self, digest: bool):
        """What a checkpoint restores into: without phantoms (host arrays) with the digest."""
        return jax.eval_shape(self.run.initial_state) if digest else self.state

    def run_round(self, state, r: int, sampled: np.ndarray):
        del r  # the runner draws everything from (seed, state.round, client id)
        return self.runner.run_round(state, sampled, self.run.seed_key)

    def evaluate(self, state, panel: np.ndarray | None):
        """(state as the test leaves it, evaluation) of every client, or of `panel`'s (whose test
        leaves the state as it is)."""
        if panel is not None:
            return state, self.runner.evaluate_panel(state, panel)
        return self.runner.tested_state(state), self.runner.evaluate(state)

    def finite(self, state, sampled: np.ndarray):
        return finite_report(self.run.method, state, jnp.asarray(sampled))

    def first_layer_masks(self, state):
        params, thresholds, _ = self.run.method.client_variables(state)
        return first_layer_masks(params, thresholds)


class StoreBackend(_Backend):
    """The clients in a store (`config.client_store`), the resident part on the devices."""

    writes_final_state = False  # the store's files are the clients' final state

    def __init__(self, run, settings, directory: str):
        self.run, self.settings, self.directory = run, settings, directory
        self.first_client = _one_client(
            federated.initial_clients(
                run.model,
                run.local_cfg,
                run.init_key,
                np.zeros(1, np.int32),
                image_shape=run.dataset.image_shape,
                client_init=settings.client_init,
            )
        )

    def build(self, macs) -> None:
        run, settings = self.run, self.settings
        self.store_runner, self.state = store_lib.make_store_runner(
            run.model,
            run.local_cfg,
            run.round_cfg,
            run.spec,
            run.train_data,
            run.test_data,
            tier=settings.client_store,
            rng=run.init_key,
            image_shape=run.dataset.image_shape,
            client_init=settings.client_init,
            directory=self.directory,
            eval_clients=min(settings.eval_panel, settings.num_clients),
            **runner_options(settings),
            macs=macs,
            algorithm=run.method.algorithm(run.model, run.local_cfg, run.round_cfg, macs),
        )
        self.runner = self.store_runner.runner

    def checkpoint_target(self, digest: bool):
        return self.runner.unpadded(self.state) if digest else self.state

    def rollback(self, rounds_done: int) -> int:
        """The clients' files as of the checkpoint of `rounds_done`: later writes undone."""
        return self.store_runner.store.rollback(rounds_done)

    def run_round(self, state, r: int, sampled: np.ndarray):
        s = self.settings
        following = None  # the next round's cohort, read while this one trains
        if r + 1 < s.rounds:
            following = self.run.sample_clients(r + 1)
        return self.store_runner.run_round(
            state, np.asarray(sampled), self.run.seed_key, following, round_index=r
        )

    def evaluate(self, state, panel: np.ndarray | None):
        clients = panel if panel is not None else np.arange(self.settings.num_clients)
        return state, self.store_runner.evaluate_clients(state, clients)

    def finite(self, state, sampled: np.ndarray):
        del state, sampled
        return self.store_runner.last_finite

    def first_layer_masks(self, state):
        return self.store_runner.map_clients(  # a chunk of clients at a time
            state,
            lambda chunk, ids: first_layer_masks(*self.run.method.client_variables(chunk)[:2]),
        )

    def flush(self) -> None:
        self.store_runner.flush()  # the clients' files are the checkpoint's clients

    def committed(self, steps: list[int]) -> None:
        if len(steps) > 1:  # nothing resumes from before the older checkpoint
            self.store_runner.store.commit(steps[-2])

    def close(self) -> None:
        self.store_runner.close()


def create(run, settings, workdir: str, clients_dirname: str):
    """The backend `settings.client_store` asks for."""
    if settings.client_store == 'device':
        return DeviceBackend(run, settings)
    return StoreBackend(run, settings, os.path.join(workdir, clients_dirname))
