"""`train_and_evaluate(config, workdir)`: a whole SpaFL run, from the dataset to the figures.

The command line (experiments/main.py) only parses flags and calls this; a notebook can call it too.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spafl_jax import backends
from spafl_jax.checkpoint import Checkpointer, PreemptionWatcher
from spafl_jax import configuration
from spafl_jax import console as console_lib
from spafl_jax import data as data_lib
from spafl_jax import execution
from spafl_jax import federated
from spafl_jax import files
from spafl_jax import methods
from spafl_jax import models
from spafl_jax import records as records_lib
from spafl_jax import reporting
from spafl_jax import workdir as workdir_lib
from spafl_jax import writers as writers_lib
from spafl_jax.configuration import data_spec, local_config, round_config  # noqa: F401
from spafl_jax.records import NonFiniteError  # noqa: F401  (re-exported)
from spafl_jax.workdir import (  # noqa: F401  (re-exported: train.WorkdirError and friends)
    ADDED_FIELDS,
    CHECKPOINT_DIRNAME,
    CLIENTS_DIRNAME,
    CONFIG_FILENAME,
    DIVERGED_FILENAME,
    LOCK_FILENAME,
    STORED_FORM_FIELDS,
    WorkdirError,
    WorkdirLock,
    changed_fields,
    prepare_workdir,
    recorded_config,
)


def build_model(settings, num_classes: int):
    dtype = None if settings.compute_dtype == 'float32' else jnp.dtype(settings.compute_dtype)
    return models.create_model(
        settings.model,
        num_classes,
        estimator=settings.estimator,
        conv_impl=settings.conv_impl,
        compute_dtype=dtype,
    )


def check_model_fits(model, settings, image_shape) -> None:
    """Abstract evaluation only (no compilation): does the model accept this dataset's images?"""
    try:
        shapes = jax.eval_shape(
            lambda: models.init_variables(model, jax.random.key(0), image_shape)
        )
    except Exception as e:  # pylint: disable=broad-except
        raise configuration.ConfigError(
            f'config.model={settings.model!r} does not accept {settings.dataset!r} images of shape '
            f'{tuple(image_shape)} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); '
            f'pick a model made for this dataset.'
        ) from None
    if not settings.drop_last and jax.tree.leaves(shapes['batch_stats']):
        raise configuration.ConfigError(
            f'config.drop_last=False needs a model without BatchNorm: the padded examples of a '
            f'partial batch would enter the batch statistics of config.model={settings.model!r}; '
            'keep config.drop_last=True.'
        )


def sample_clients(seed: int, round_index: int, num_clients: int, num_sampled: int) -> np.ndarray:
    """S of N clients uniformly without replacement; depends on (seed, round) only."""
    rng = np.random.default_rng([seed, round_index])
    return np.sort(rng.choice(num_clients, num_sampled, replace=False)).astype(np.int32)


def min_train_examples(settings) -> int:
    """The split is redrawn until every client can take a local step: a full batch when the last
    partial batch is dropped, one example otherwise (the official FMNIST folder never redraws; with
    its 100 clients a client without examples is rare)."""
    return settings.batch_size if settings.drop_last else 1


def split_data(settings, dataset: data_lib.Dataset):
    minimum = min_train_examples(settings)
    try:
        return federated.split_clients(
            dataset,
            settings.num_clients,
            alpha=settings.alpha,
            min_train_examples=minimum,
            seed=settings.seed,
        )
    except ValueError as e:
        raise configuration.ConfigError(
            f'the Dirichlet split cannot give each of config.num_clients={settings.num_clients} '
            f'clients {minimum} examples of {settings.dataset} with '
            f'config.alpha={settings.alpha} ({e}); use fewer clients, a smaller batch or a larger '
            'alpha.'
        ) from None


def save_final_state(path: str, state, method: methods.Method) -> None:
    """All clients' weights, thresholds and BatchNorm statistics (leading client axis), msgpack.

    `state` holds host arrays (`execution.host_local`), so a state sharded over hosts is whole.
    """
    params, thresholds, batch_stats = method.client_variables(state)
    tree = {'params': params, 'thresholds': thresholds, 'batch_stats': batch_stats}
    if method.communicates_thresholds:
        tree['server_thresholds'] = state.server_thresholds
    files.write_atomic(path, flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, tree)))


class Preempted(RuntimeError):  # noqa: N818  (not an error: the run stops as asked)
    """SIGTERM/SIGINT arrived; a checkpoint was written at the round boundary."""

    def __init__(self, signum: int, round_index: int, workdir: str):
        super().__init__(
            f'stopped by signal {signum} after round {round_index}; checkpoint '
            f'saved in {workdir}: run the same command to resume.'
        )
        self.signum = signum


class Run:
    """Everything a run needs that does not change between rounds (built before any compilation)."""

    def __init__(
        self,
        settings: configuration.Settings | ml_collections.ConfigDict,
        console: console_lib.Console | None = None,
    ):
        console = console or console_lib.Console(enabled=False)
        self.settings = settings
        console.line(f'loading {settings.dataset}')
        self.dataset = data_lib.load_dataset(
            settings.dataset,
            os.path.expanduser(settings.data_dir or '') or None,
            download=settings.download,
        )
        self.model = build_model(settings, self.dataset.num_classes)
        check_model_fits(self.model, settings, self.dataset.image_shape)
        console.line(
            f'splitting {len(self.dataset.train_labels)} + {len(self.dataset.test_labels)} '
            f'examples over {settings.num_clients} clients (Dirichlet alpha {settings.alpha})'
        )
        self.train_data, self.test_data = split_data(settings, self.dataset)
        self.local_cfg, self.round_cfg = local_config(settings), round_config(settings)
        self.spec = data_spec(settings, self.dataset)
        self.seed_key = jax.random.key(settings.seed)
        self.method = methods.get(settings.method, settings)

    @property
    def init_key(self) -> jax.Array:
        """The key of round 0's models (`Method.init_state`)."""
        return jax.random.fold_in(self.seed_key, 2**31 - 1)

    def sample_clients(self, round_index: int) -> np.ndarray:
        """The clients round `round_index` (0-based) trains (`sample_clients`)."""
        c = self.settings
        return sample_clients(c.seed, round_index, c.num_clients, c.clients_per_round)

    def initial_state(self):
        return self.method.init_state(
            self.model,
            self.local_cfg,
            self.init_key,
            num_clients=self.settings.num_clients,
            image_shape=self.dataset.image_shape,
            num_classes=self.dataset.num_classes,
        )


def evaluation_panel(settings) -> np.ndarray | None:
    """The clients an evaluated round tests when there are more than `config.eval_panel`: that
    many, drawn once from the seed, sorted; None when every evaluation tests every client."""
    size = settings.eval_panel
    if size >= settings.num_clients:
        return None
    rng = np.random.default_rng([settings.seed, 0x9A4E1])  # the panel's own stream
    return np.sort(rng.choice(settings.num_clients, size, replace=False)).astype(np.int32)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    overwrite: bool = False,
    console: console_lib.Console | None = None,
) -> dict[str, Any]:
    """Runs SpaFL as configured, resuming from the newest good checkpoint in `workdir`.

    Writes config.json, metrics.jsonl (one line per evaluated round), checkpoints/, summary.json,
    final_state.msgpack and the figures. Raises ConfigError, DatasetUnavailableError, WorkdirError,
    NonFiniteError or Preempted with a message meant for the user. The workdir is locked while the
    run lasts (`WorkdirLock`): a second run on it stops with a WorkdirError.

    In a multi-host run every process calls this with the same config and a workdir they all see
    (a shared file system). Every process computes; process 0 alone writes the files (and holds
    the lock), and all of them take part in the checkpoints.

    Progress goes to `console` (default: stdout, on process 0 only; `Console(enabled=False)` for
    silence): start-up steps, one line per evaluated round with the ETA, and the result.
    """
    lock = WorkdirLock(workdir)
    try:
        return _train_and_evaluate(config, workdir, overwrite, lock, console)
    finally:
        lock.release()


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    overwrite: bool,
    lock: WorkdirLock,
    console: console_lib.Console | None,
) -> dict[str, Any]:
    settings, run, lead, console = _start(config, workdir, overwrite, lock, console)
    console.line(
        f'initializing {settings.num_clients} clients ({settings.client_init} initial model)'
    )
    backend = backends.create(run, settings, workdir, CLIENTS_DIRNAME)  # devices, or a store
    facts = records_lib.ModelFacts(run, settings, backend.first_client)
    first = backend.first_client
    macs = federated.layer_macs(
        run.model,
        {'params': first.params, 'thresholds': first.thresholds, 'batch_stats': first.batch_stats},
        run.dataset.image_shape,
    )
    backend.build(macs)
    # With the digest, checkpoints hold host arrays without phantoms; without it, the state as it
    # lies on the devices (phantoms included), each process writing its own shards.
    checkpointer = Checkpointer(
        os.path.join(workdir, CHECKPOINT_DIRNAME), digest=settings.checkpoint_digest
    )
    state, start_round, progress = _restore(settings, workdir, backend, checkpointer, console)
    logging.info(
        '%s on %s: %d clients (%d per round), %d masked weights, %d thresholds; '
        'train examples per client %d..%d',
        settings.model,
        settings.dataset,
        settings.num_clients,
        settings.clients_per_round,
        facts.masked_weights,
        facts.num_thresholds,
        int(run.train_data.counts.min()),
        int(run.train_data.counts.max()),
    )
    if start_round > settings.rounds:
        checkpointer.close()
        raise WorkdirError(
            f'workdir {workdir!r} holds a run already at round {start_round}, past '
            f'config.rounds={settings.rounds}; ask for at least {start_round} rounds '
            'or pass another --workdir.'
        )
    summary_path = os.path.join(workdir, 'summary.json')
    previous_summary = _previous_summary(summary_path, start_round, settings.rounds, lead)

    # -- The records: rounds after the checkpoint are recomputed, so their lines are dropped.
    writer = None
    if lead:
        writer = writers_lib.create(
            workdir, settings.writers, resume_from_round=start_round + 1, hparams=config.to_dict()
        )
    execution.barrier('spafl_jax: metrics file repaired')  # then every process reads the same lines
    metrics = reporting.read_metrics(os.path.join(workdir, reporting.METRICS_FILENAME))
    recorder = records_lib.Recorder(
        settings, facts, workdir, writer, metrics, console, lead, checkpointer.directory
    )
    if progress is not None:
        recorder.resume(progress)
    state = _run_rounds(
        settings, run, backend, recorder, checkpointer, writer, state, start_round, workdir
    )
    summary = _finish(run, backend, recorder, state, previous_summary, summary_path, lead)
    console.line(
        f'done: accuracy {100 * summary["accuracy"]:.2f}%, density {100 * summary["density"]:.2f}%'
        f', sent {console_lib.format_bits(summary["bits_up"] + summary["bits_down"])}, '
        f'{summary["seconds_per_round"]:.2f} s/round; results in {workdir}'
    )
    return summary


def _run_rounds(
    settings, run, backend, recorder, checkpointer, writer, state, start_round, workdir
):
    """Rounds `start_round`..`config.rounds`: the host takes round r's results while round r + 1
    runs, so it never waits for the device between rounds, except where a checkpoint needs the
    state checked. Returns the last state; the checkpoints, the records and the backend are
    closed whatever happens."""
    digest = settings.checkpoint_digest
    sparsity_rounds = set(settings.sparsity_rounds) | {settings.rounds}
    panel = evaluation_panel(settings)

    def save_checkpoint(rounds_done: int) -> None:
        try:
            backend.flush()
            checkpointer.save(
                rounds_done, backend.saved_state(state, digest), recorder.progress(rounds_done)
            )
            backend.committed(checkpointer.steps())
        except OSError as e:
            raise workdir_lib.disk_error(e, workdir, 'a checkpoint') from None

    def evaluation_kind(r: int) -> str | None:
        """What is evaluated after round r: None, the panel, or every client ('sweep')."""
        if (r + 1) % settings.eval_every and r + 1 != settings.rounds:
            return None
        last = r + 1 == settings.rounds
        sweep = panel is None or (r + 1) % settings.eval_sweep_every == 0 or last
        return 'sweep' if sweep else 'panel'

    def dispatch(r: int, state):
        """Round r on the device, and what the host will want of it; nothing waits for it here."""
        sampled = run.sample_clients(r)
        state, round_metrics = backend.run_round(state, r, sampled)
        evaluation, kind = None, evaluation_kind(r)
        if kind is not None:  # testing may change the state (collapse_check='previous')
            state, evaluation = backend.evaluate(state, panel if kind == 'panel' else None)
        finite = backend.finite(state, sampled)
        masks = backend.first_layer_masks(state) if r + 1 in sparsity_rounds else None
        return state, (r, sampled, round_metrics, evaluation, finite, masks)

    if start_round < settings.rounds:
        recorder.console.line(f'round {start_round + 1} compiles (and the first evaluation)')
    recorder.restart_clock()
    try:
        with PreemptionWatcher() as preemption:
            pending, compiled = None, set()
            for r in range(start_round, settings.rounds):
                kind = evaluation_kind(r)
                if pending is not None and kind is not None and kind not in compiled:
                    recorder.process(pending)  # first: its time would include a compilation
                    pending = None
                compiled.add(kind)
                state, current = dispatch(r, state)
                if pending is not None:
                    recorder.process(pending)
                pending = current
                # Every process must take the same branch: a signal that reached one stops all.
                preempted = execution.any_process(bool(preemption.received))
                if (r + 1) % settings.checkpoint_every == 0 or preempted:
                    recorder.process(pending)
                    pending = None
                    save_checkpoint(r + 1)
                if preempted:
                    raise Preempted(preemption.received or signal.SIGTERM, r + 1, workdir)
            if pending is not None:
                recorder.process(pending)
            if not checkpointer.steps() or checkpointer.steps()[-1] != settings.rounds:
                save_checkpoint(settings.rounds)
    finally:
        if writer is not None:
            writer.close()
        checkpointer.close()
        backend.close()

    return state


def _start(config, workdir: str, overwrite: bool, lock: WorkdirLock, console):
    """The config checked and frozen into settings, the runtime set up, the data loaded and the
    workdir taken; nothing compiled yet. Returns (settings, run, lead, console). The ConfigDict is
    read here only, to check it and to record it in the workdir."""
    configuration.validate(config)
    workdir_lib.keep_the_stored_form(config, workdir, overwrite)
    settings = configuration.settings(config)
    execution.initialize_from_config(settings)  # before anything touches a device
    lead = jax.process_index() == 0
    if jax.process_count() > 1:  # every process says who it is, once, so a pod's logs show it
        print(
            f'spafl_jax: process {jax.process_index()} of {jax.process_count()}, '
            f'{jax.local_device_count()} of {jax.device_count()} devices here',
            flush=True,
        )
    console = console or console_lib.Console(enabled=lead)
    console.line(
        f'{settings.dataset} / {settings.model}: {settings.num_clients} clients, '
        f'{settings.clients_per_round} per round, {settings.rounds} rounds -> {workdir}'
    )
    run = Run(settings, console)  # loads and splits the data: fails before anything is written
    if lead:
        prepare_workdir(workdir, config, overwrite=overwrite, lock=lock)
        try:
            reporting.write_json_atomic(os.path.join(workdir, CONFIG_FILENAME), config.to_dict())
        except OSError as e:
            raise workdir_lib.disk_error(e, workdir, CONFIG_FILENAME) from None
    execution.barrier('spafl_jax: workdir prepared')
    return settings, run, lead, console


def _restore(settings, workdir: str, backend, checkpointer, console):
    """(state, rounds done, the checkpoint's progress record or None): the newest good checkpoint,
    or round 0's state; a store's files taken back to the checkpoint."""
    state, start_round, progress = backend.state, 0, None
    restored = checkpointer.restore_latest(backend.checkpoint_target(checkpointer.digest))
    if restored is not None:
        state, progress = restored
        leaves = jax.tree.leaves(state.clients)
        saved = leaves[0].shape if leaves else None
        if not checkpointer.digest and leaves and saved != _client_shape(backend.state):
            # saved on another number of devices: its phantoms dropped, ours added when placed
            n = settings.num_clients
            state = state.replace(clients=jax.tree.map(lambda x: x[:n], state.clients))
        start_round = int(progress['round'])
        logging.info('resuming from the checkpoint of round %d in %s', start_round, workdir)
        console.line(f'resuming after round {start_round} (checkpoint in {workdir})')
    undone = backend.rollback(start_round)
    if undone:
        logging.info('%d writes of clients after round %d undone', undone, start_round)
    return state, start_round, progress


def _client_shape(state):
    return jax.tree.leaves(state.clients)[0].shape


def _finish(run, backend, recorder, state, previous_summary, summary_path: str, lead: bool):
    """The summary, the final state and the figures (derived files: a figure that already shows
    the same is left untouched)."""
    workdir = os.path.dirname(summary_path)
    host_state = backend.runner.unpadded(execution.host_local(state))
    try:
        summary = recorder.summary(previous_summary, summary_path)
        if lead:
            if backend.writes_final_state:
                path = os.path.join(workdir, 'final_state.msgpack')
                save_final_state(path, host_state, run.method)
            reporting.write_json_atomic(summary_path, summary)
            reporting.plot_metrics(recorder.records, workdir)
            for round_, packed in sorted(recorder.sparsity.items(), key=lambda i: int(i[0])):
                records_lib.draw_sparsity(workdir, recorder.facts.names[0], int(round_), packed)
    except OSError as e:
        raise workdir_lib.disk_error(e, workdir, 'the summary and figures') from None
    return summary


def _previous_summary(path: str, start_round: int, rounds: int, lead: bool) -> dict | None:
    """The summary of a complete run already in the workdir (its timings are kept if the rest
    still holds); a run extended to more rounds loses its summary of fewer."""
    if start_round < rounds and lead and os.path.exists(path):
        os.remove(path)
    if start_round != rounds or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            previous = json.load(f)
        if not isinstance(previous, dict):
            raise ValueError('not a JSON object')
    except (OSError, ValueError) as e:  # rebuilt from the checkpoint and the metrics
        logging.warning('%s cannot be read (%s); it is written again.', path, e)
        return None
    logging.info(
        'the run in %s is already complete (%d rounds); its summary, final state and figures '
        'are checked against the checkpoint and the metrics.',
        os.path.dirname(path),
        rounds,
    )
    return previous
