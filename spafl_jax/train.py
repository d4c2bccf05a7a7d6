"""`train_and_evaluate(config, workdir)`: a whole SpaFL run, from the dataset to the figures.

The command line (experiments/main.py) only parses flags and calls this; a notebook can call it too.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spafl_jax import client as client_lib
from spafl_jax.checkpoint import Checkpointer, PreemptionWatcher
from spafl_jax import configuration
from spafl_jax import console as console_lib
from spafl_jax import data as data_lib
from spafl_jax import execution
from spafl_jax import federated
from spafl_jax import files
from spafl_jax import masking
from spafl_jax import methods
from spafl_jax import metrics as metrics_lib
from spafl_jax import models
from spafl_jax import reporting
from spafl_jax import store as store_lib
from spafl_jax import writers as writers_lib


def local_config(config) -> client_lib.LocalConfig:
    return client_lib.LocalConfig(
        batch_size=config.batch_size,
        local_epochs=config.local_epochs,
        lr=config.lr,
        lr_decay=config.lr_decay,
        min_lr=config.min_lr,
        clip=config.clip,
        th_coeff=config.th_coeff,
        penalty_warmup=config.penalty_warmup,
        persistent_optimizer=config.persistent_optimizer,
        drop_last=config.drop_last,
        collapse_check=config.collapse_check,
    )


def round_config(config) -> federated.RoundConfig:
    return federated.RoundConfig(
        clients_per_round=config.clients_per_round,
        importance_update=config.importance_update,
        aggregation=config.aggregation,
    )


def data_spec(config, dataset: data_lib.Dataset) -> client_lib.DataSpec:
    return client_lib.DataSpec(
        pixel_max=dataset.pixel_max,
        mean=tuple(dataset.mean),
        std=tuple(dataset.std),
        normalize=not config.raw_pixels,
        augment=config.augment,
    )


def build_model(config, num_classes: int):
    dtype = None if config.compute_dtype == 'float32' else jnp.dtype(config.compute_dtype)
    return models.create_model(
        config.model,
        num_classes,
        estimator=config.estimator,
        conv_impl=config.conv_impl,
        compute_dtype=dtype,
    )


def check_model_fits(model, config, image_shape) -> None:
    """Abstract evaluation only (no compilation): does the model accept this dataset's images?"""
    try:
        shapes = jax.eval_shape(
            lambda: models.init_variables(model, jax.random.key(0), image_shape)
        )
    except Exception as e:  # pylint: disable=broad-except
        raise configuration.ConfigError(
            f'config.model={config.model!r} does not accept {config.dataset!r} images of shape '
            f'{tuple(image_shape)} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); '
            f'pick a model made for this dataset.'
        ) from None
    if not config.drop_last and jax.tree.leaves(shapes['batch_stats']):
        raise configuration.ConfigError(
            f'config.drop_last=False needs a model without BatchNorm: the padded examples of a '
            f'partial batch would enter the batch statistics of config.model={config.model!r}; '
            'keep config.drop_last=True.'
        )


def sample_clients(seed: int, round_index: int, num_clients: int, num_sampled: int) -> np.ndarray:
    """S of N clients uniformly without replacement; depends on (seed, round) only."""
    rng = np.random.default_rng([seed, round_index])
    return np.sort(rng.choice(num_clients, num_sampled, replace=False)).astype(np.int32)


def min_train_examples(config) -> int:
    """The split is redrawn until every client can take a local step: a full batch when the last
    partial batch is dropped, one example otherwise (the official FMNIST folder never redraws; with
    its 100 clients a client without examples is rare)."""
    return config.batch_size if config.drop_last else 1


def split_data(config, dataset: data_lib.Dataset):
    minimum = min_train_examples(config)
    try:
        return federated.split_clients(
            dataset,
            config.num_clients,
            alpha=config.alpha,
            min_train_examples=minimum,
            seed=config.seed,
        )
    except ValueError as e:
        raise configuration.ConfigError(
            f'the Dirichlet split cannot give each of config.num_clients={config.num_clients} '
            f'clients {minimum} examples of {config.dataset} with '
            f'config.alpha={config.alpha} ({e}); use fewer clients, a smaller batch or a larger '
            'alpha.'
        ) from None


def _one_client(tree):
    return jax.tree.map(lambda x: x[0], tree)


def _without(d: dict[str, Any], keys) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def save_final_state(path: str, state, method: methods.Method) -> None:
    """All clients' weights, thresholds and BatchNorm statistics (leading client axis), msgpack.

    `state` holds host arrays (`execution.host_local`), so a state sharded over hosts is whole.
    """
    params, thresholds, batch_stats = method.client_variables(state)
    tree = {'params': params, 'thresholds': thresholds, 'batch_stats': batch_stats}
    if method.communicates_thresholds:
        tree['server_thresholds'] = state.server_thresholds
    files.write_atomic(path, flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, tree)))


def _pack_masks(masks: np.ndarray) -> dict[str, Any]:
    """[clients, rows] 0/1 masks as a JSON value (a checkpoint's progress record holds them)."""
    masks = np.asarray(masks) != 0
    return {'shape': list(masks.shape), 'bits': np.packbits(masks).tobytes().hex()}


def _unpack_masks(packed: dict[str, Any]) -> np.ndarray:
    shape = tuple(packed['shape'])
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed['bits']), np.uint8))
    return bits[: int(np.prod(shape))].reshape(shape).astype(np.float32)


def _draw_sparsity(workdir: str, layer: str, round_: int, packed: dict[str, Any]) -> None:
    reporting.plot_sparsity_pattern(
        _unpack_masks(packed),
        os.path.join(workdir, f'sparsity_round_{round_:04d}.png'),
        layer=layer,
        round_=round_,
    )


class WorkdirError(RuntimeError):
    """The workdir cannot be used as asked; nothing in it was changed."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinity, or a loss above `config.max_loss`: it diverged. The
    last good checkpoint is left as it was."""


class Preempted(RuntimeError):  # noqa: N818  (not an error: the run stops as asked)
    """SIGTERM/SIGINT arrived; a checkpoint was written at the round boundary."""

    def __init__(self, signum: int, round_index: int, workdir: str):
        super().__init__(
            f'stopped by signal {signum} after round {round_index}; checkpoint '
            f'saved in {workdir}: run the same command to resume.'
        )
        self.signum = signum


# Fields added after runs were already written, with the value that reproduces those runs: a
# workdir whose config.json lacks one resumes as if it held that value.
ADDED_FIELDS = {
    'collapse_check': 'current',
    'max_loss': 1e6,
    'lazy_importance': False,
    'client_store': 'device',
    'checkpoint_digest': True,
}
LOCK_FILENAME = '.lock'
# Fields that choose only how a state is stored (the same results to float rounding): a resumed run
# keeps the form its checkpoints have, whatever the command says.
STORED_FORM_FIELDS = ('lazy_importance', 'checkpoint_digest')

CONFIG_FILENAME = 'config.json'
# Written when a run stops on a non-finite or exploding loss: {"round": r, "error": message}, so
# that the run's compact record says it diverged (tables show it) rather than that it stopped.
DIVERGED_FILENAME = 'diverged.json'
CHECKPOINT_DIRNAME = 'checkpoints'
# With config.client_store='disk': the clients' models, one file each (spafl_jax/store.py).
CLIENTS_DIRNAME = 'clients'


def recorded_config(workdir: str) -> dict | None:
    """The config the run in `workdir` was started with, fields added since at the value that
    reproduces it (`ADDED_FIELDS`); None if there is none. Raises OSError or ValueError when
    config.json cannot be read."""
    path = os.path.join(workdir, CONFIG_FILENAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return {**ADDED_FIELDS, **json.load(f)}


def changed_fields(
    recorded: dict, config: ml_collections.ConfigDict, *, resuming: bool
) -> list[str]:
    """The fields, sorted, in which `config` differs from a `recorded` run's config. The stored
    form never counts (a resumed run keeps its own: `_keep_the_stored_form`); with `resuming`,
    neither do the `configuration.RESUMABLE_FIELDS`."""
    current = json.loads(json.dumps(config.to_dict()))  # tuples as lists, as on disk
    ignored = (
        STORED_FORM_FIELDS
        + configuration.REMOVED_FIELDS
        + (configuration.RESUMABLE_FIELDS if resuming else ())
    )
    return sorted(
        k
        for k in set(recorded) | set(current)
        if k not in ignored and recorded.get(k) != current.get(k)
    )


def _keep_the_stored_form(config, workdir: str, overwrite: bool) -> None:
    """`STORED_FORM_FIELDS` of the run already in `workdir` (if any) override `config`'s."""
    if overwrite:
        return
    try:
        previous = recorded_config(workdir)
    except (OSError, ValueError):
        return  # prepare_workdir says what is wrong with it
    if previous is None:
        return
    for field in STORED_FORM_FIELDS:
        if field in config and previous.get(field) != config[field]:
            logging.info('%s=%r as the run in %s was started', field, previous[field], workdir)
            config[field] = previous[field]


class WorkdirLock:
    """One run at a time in a workdir: an exclusive `flock` on `<workdir>/.lock`, held until the
    run ends. The kernel drops it when the process dies, however it dies, so a crashed or killed
    run never leaves the workdir locked."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILENAME)
        self._file = None

    def acquire(self) -> None:
        try:
            f = open(self.path, 'a+')
        except OSError as e:
            raise WorkdirError(
                f'workdir {os.path.dirname(self.path)!r}: its lock file cannot be '
                f'opened ({e.strerror}); pass a writable --workdir.'
            ) from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or 'another process'
            f.close()
            raise WorkdirError(
                f'workdir {os.path.dirname(self.path)!r} is in use by another run '
                f'({holder}); wait for it to finish, or pass another --workdir.'
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def prepare_workdir(
    workdir: str,
    config: ml_collections.ConfigDict,
    *,
    overwrite: bool,
    lock: WorkdirLock | None = None,
) -> None:
    """Creates the workdir and takes its `lock`; a workdir holding a run with another config is
    refused or cleared."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(
            f'workdir {workdir!r} is a file, not a directory; pass a directory as --workdir.'
        )
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(
            f'workdir {workdir!r} cannot be created ({e.strerror}); pass a writable --workdir.'
        ) from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f'workdir {workdir!r} is not writable; pass a writable --workdir.')
    if lock is not None:
        lock.acquire()
    if not overwrite:
        try:
            previous = recorded_config(workdir)
        except (OSError, ValueError) as e:
            raise WorkdirError(
                f'workdir {workdir!r} holds an unreadable {CONFIG_FILENAME} ({e}); '
                'pass --overwrite to start afresh there, or another --workdir.'
            ) from None
        differing = [] if previous is None else changed_fields(previous, config, resuming=True)
        if differing:
            current = json.loads(json.dumps(config.to_dict()))
            detail = ', '.join(
                f'{k}: {previous.get(k)!r} -> {current.get(k)!r}' for k in differing[:5]
            )
            raise WorkdirError(
                f'workdir {workdir!r} holds a run with a different config ({detail}); '
                'pass another --workdir, or --overwrite to replace that run.'
            )
    if overwrite:
        for name in (
            CONFIG_FILENAME,
            reporting.METRICS_FILENAME,
            'summary.json',
            DIVERGED_FILENAME,
            'final_state.msgpack',
        ):
            if os.path.exists(os.path.join(workdir, name)):
                os.remove(os.path.join(workdir, name))
        for name in (CHECKPOINT_DIRNAME, reporting.TENSORBOARD_DIRNAME, CLIENTS_DIRNAME):
            shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)


class Run:
    """Everything a run needs that does not change between rounds (built before any compilation)."""

    def __init__(
        self, config: ml_collections.ConfigDict, console: console_lib.Console | None = None
    ):
        console = console or console_lib.Console(enabled=False)
        self.config = config
        console.line(f'loading {config.dataset}')
        self.dataset = data_lib.load_dataset(
            config.dataset,
            os.path.expanduser(config.data_dir or '') or None,
            download=config.download,
        )
        self.model = build_model(config, self.dataset.num_classes)
        check_model_fits(self.model, config, self.dataset.image_shape)
        console.line(
            f'splitting {len(self.dataset.train_labels)} + {len(self.dataset.test_labels)} '
            f'examples over {config.num_clients} clients (Dirichlet alpha {config.alpha})'
        )
        self.train_data, self.test_data = split_data(config, self.dataset)
        self.local_cfg, self.round_cfg = local_config(config), round_config(config)
        self.spec = data_spec(config, self.dataset)
        self.seed_key = jax.random.key(config.seed)
        self.method = methods.get(config.method, config)

    @property
    def init_key(self) -> jax.Array:
        """The key of round 0's models (`Method.init_state`)."""
        return jax.random.fold_in(self.seed_key, 2**31 - 1)

    def initial_state(self):
        return self.method.init_state(
            self.model,
            self.local_cfg,
            self.init_key,
            num_clients=self.config.num_clients,
            image_shape=self.dataset.image_shape,
            num_classes=self.dataset.num_classes,
        )


def evaluation_panel(config) -> np.ndarray | None:
    """The clients an evaluated round tests when there are more than `config.eval_panel`: that
    many, drawn once from the seed, sorted; None when every evaluation tests every client."""
    size = config.eval_panel
    if size >= config.num_clients:
        return None
    rng = np.random.default_rng([config.seed, 0x9A4E1])  # the panel's own stream
    return np.sort(rng.choice(config.num_clients, size, replace=False)).astype(np.int32)


@jax.jit
def _first_layer_masks(params, thresholds) -> jax.Array:
    """[clients, rows] kept rows of every client's first masked layer (1 kept, 0 pruned), as the
    evaluated model uses them (collapsed layers reset)."""
    thresholds = jax.vmap(masking.reset_collapsed_thresholds)(params, thresholds)
    kernel = jax.tree.leaves(masking.kernels_of(params, thresholds))[0]
    threshold = jax.tree.leaves(thresholds)[0]
    return jax.vmap(masking.hard_row_mask)(kernel, threshold).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _finite_report(method, state, sampled):
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


def _disk_error(e: OSError, workdir: str, what: str) -> WorkdirError:
    reason = 'the disk is full' if e.errno == errno.ENOSPC else e.strerror or str(e)
    return WorkdirError(
        f'writing {what} in {workdir!r} failed: {reason}. Files already written '
        'are intact; free space and run the same command to resume.'
    )


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
    configuration.validate(config)
    execution.initialize_from_config(config)  # before anything touches a device
    lead = jax.process_index() == 0
    if jax.process_count() > 1:  # every process says who it is, once, so a pod's logs show it
        print(
            f'spafl_jax: process {jax.process_index()} of {jax.process_count()}, '
            f'{jax.local_device_count()} of {jax.device_count()} devices here',
            flush=True,
        )
    console = console or console_lib.Console(enabled=lead)
    console.line(
        f'{config.dataset} / {config.model}: {config.num_clients} clients, '
        f'{config.clients_per_round} per round, {config.rounds} rounds -> {workdir}'
    )
    _keep_the_stored_form(config, workdir, overwrite)
    # Loads and splits the data; fails before anything is written or compiled.
    run = Run(config, console)
    if lead:
        prepare_workdir(workdir, config, overwrite=overwrite, lock=lock)
        try:
            reporting.write_json_atomic(os.path.join(workdir, CONFIG_FILENAME), config.to_dict())
        except OSError as e:
            raise _disk_error(e, workdir, CONFIG_FILENAME) from None
    execution.barrier('spafl_jax: workdir prepared')

    summary_path = os.path.join(workdir, 'summary.json')
    console.line(f'initializing {config.num_clients} clients ({config.client_init} initial model)')
    stored = config.client_store != 'device'
    if stored:  # the clients live in a store: nothing of all N is built here
        one = _one_client(
            federated.initial_clients(
                run.model,
                run.local_cfg,
                run.init_key,
                np.zeros(1, np.int32),
                image_shape=run.dataset.image_shape,
                client_init=config.client_init,
            )
        )
    else:  # each device creates its own clients (padded with phantoms, sharded)
        state = execution.create_sharded(run.initial_state, config.num_clients)
        params, thresholds, batch_stats = run.method.client_variables(state)
        one = _one_client(
            client_lib.ClientState(
                params=params, thresholds=thresholds, batch_stats=batch_stats, opt_state=()
            )
        )
    macs = federated.layer_macs(
        run.model,
        {'params': one.params, 'thresholds': one.thresholds, 'batch_stats': one.batch_stats},
        run.dataset.image_shape,
    )
    names = masking.layer_names(one.thresholds)
    num_thresholds = sum(t.size for t in jax.tree.leaves(one.thresholds))
    masked_weights = sum(
        k.size for k in jax.tree.leaves(masking.kernels_of(one.params, one.thresholds))
    )
    num_params = sum(p.size for p in jax.tree.leaves(one.params))
    bits_up_round, bits_down_round = run.method.bits_per_round(
        config.num_clients,
        config.clients_per_round,
        {'params': one.params, 'thresholds': one.thresholds, 'batch_stats': one.batch_stats},
        config.importance_update,
    )
    dense_bits_round = metrics_lib.dense_bits_per_round(num_params, config.clients_per_round)

    store_runner = None
    if stored:
        store_runner, state = store_lib.make_store_runner(
            run.model,
            run.local_cfg,
            run.round_cfg,
            run.spec,
            run.train_data,
            run.test_data,
            tier=config.client_store,
            rng=run.init_key,
            image_shape=run.dataset.image_shape,
            client_init=config.client_init,
            directory=os.path.join(workdir, CLIENTS_DIRNAME),
            eval_clients=min(config.eval_panel, config.num_clients),
            **execution.runner_options(config),
            macs=macs,
            algorithm=run.method.algorithm(run.model, run.local_cfg, run.round_cfg, macs),
        )
    # With the digest, checkpoints hold host arrays without phantoms; without it, the state as it
    # lies on the devices (phantoms included), each process writing its own shards.
    digest = config.checkpoint_digest
    checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIRNAME), digest=digest)
    totals = {'bits_up': 0, 'bits_down': 0, 'flops': 0.0, 'steps': 0.0, 'max_steps': 0.0}
    sparsity = {}  # round (a string, as JSON keys are) -> packed first-layer masks
    start_round = 0
    timer = console_lib.RoundTimer()
    # Checkpoints hold the clients without phantoms: the target is the unpadded state's shape.
    if digest:
        target = (
            store_runner.runner.unpadded(state) if stored else jax.eval_shape(run.initial_state)
        )
    else:
        target = state
    restored = checkpointer.restore_latest(target)
    if restored is not None:
        state, progress = restored
        leaves = jax.tree.leaves(state.clients)
        if not digest and leaves and leaves[0].shape != jax.tree.leaves(target.clients)[0].shape:
            # saved on another number of devices: its phantoms dropped, ours added when placed
            n = config.num_clients
            state = state.replace(clients=jax.tree.map(lambda x: x[:n], state.clients))
        start_round, totals = int(progress['round']), progress['totals']
        sparsity = dict(progress.get('sparsity', {}))  # absent in checkpoints of older versions
        timer = console_lib.RoundTimer(progress.get('timing'))  # absent in older checkpoints too
        logging.info('resuming from the checkpoint of round %d in %s', start_round, workdir)
        console.line(f'resuming after round {start_round} (checkpoint in {workdir})')
    if stored:  # the clients' files as of the checkpoint: later writes undone
        undone = store_runner.store.rollback(start_round)
        if undone:
            logging.info('%d writes of clients after round %d undone', undone, start_round)
    logging.info(
        '%s on %s: %d clients (%d per round), %d masked weights, %d thresholds; '
        'train examples per client %d..%d',
        config.model,
        config.dataset,
        config.num_clients,
        config.clients_per_round,
        masked_weights,
        num_thresholds,
        int(run.train_data.counts.min()),
        int(run.train_data.counts.max()),
    )

    if start_round > config.rounds:
        checkpointer.close()
        raise WorkdirError(
            f'workdir {workdir!r} holds a run already at round {start_round}, past '
            f'config.rounds={config.rounds}; ask for at least {start_round} rounds '
            'or pass another --workdir.'
        )
    previous_summary = None  # of a complete run: its timings are kept if the rest still holds
    if start_round < config.rounds and lead and os.path.exists(summary_path):
        os.remove(summary_path)  # a run extended to more rounds: that summary is of fewer
    if start_round == config.rounds and os.path.exists(summary_path):
        try:
            with open(summary_path) as f:
                previous_summary = json.load(f)
            if not isinstance(previous_summary, dict):
                raise ValueError('not a JSON object')
        except (OSError, ValueError) as e:  # rebuilt below from the checkpoint and the metrics
            logging.warning('%s cannot be read (%s); it is written again.', summary_path, e)
            previous_summary = None
        else:
            logging.info(
                'the run in %s is already complete (%d rounds); its summary, final state '
                'and figures are checked against the checkpoint and the metrics.',
                workdir,
                config.rounds,
            )

    if stored:
        runner = store_runner.runner
    else:
        round_fn, eval_fn = execution.make_round_functions(
            config,
            run.method,
            run.model,
            local_cfg=run.local_cfg,
            round_cfg=run.round_cfg,
            spec=run.spec,
            train_data=run.train_data,
            test_data=run.test_data,
            macs=macs,
        )
        runner = round_fn.runner
    # Rounds after the checkpoint are recomputed, so their lines (from a killed run) are dropped.
    writer = (
        writers_lib.create(
            workdir,
            config.writers,
            resume_from_round=start_round + 1,
            hparams=config.to_dict(),
        )
        if lead
        else None
    )
    execution.barrier('spafl_jax: metrics file repaired')  # then every process reads the same lines
    records = reporting.read_metrics(os.path.join(workdir, reporting.METRICS_FILENAME))
    sparsity_rounds = set(config.sparsity_rounds) | {config.rounds}
    panel = evaluation_panel(config)
    sweep_every = config.eval_sweep_every
    round_seconds = []
    max_loss = float(config.max_loss)

    def save_checkpoint(rounds_done: int) -> None:
        try:
            if stored:
                store_runner.flush()  # the clients' files are the checkpoint's clients
            checkpointer.save(
                rounds_done,
                runner.unpadded(execution.host_local(state)) if digest else state,
                {
                    'round': rounds_done,
                    'totals': totals,
                    'sparsity': sparsity,
                    'timing': timer.state(),
                },
            )
            steps = checkpointer.steps()
            if stored and len(steps) > 1:  # nothing resumes from before the older checkpoint
                store_runner.store.commit(steps[-2])
        except OSError as e:
            raise _disk_error(e, workdir, 'a checkpoint') from None

    def evaluation_kind(r: int) -> str | None:
        """What is evaluated after round r: None, the panel, or every client ('sweep')."""
        if (r + 1) % config.eval_every and r + 1 != config.rounds:
            return None
        sweep = panel is None or (r + 1) % sweep_every == 0 or r + 1 == config.rounds
        return 'sweep' if sweep else 'panel'

    def dispatch(r: int, state):
        """Round r on the device, and what the host will want of it; nothing waits for it here."""
        sampled = jnp.asarray(
            sample_clients(config.seed, r, config.num_clients, config.clients_per_round)
        )
        evaluation, kind = None, evaluation_kind(r)
        if stored:
            following = None
            if r + 1 < config.rounds:
                following = sample_clients(
                    config.seed, r + 1, config.num_clients, config.clients_per_round
                )
            state, round_metrics = store_runner.run_round(
                state, np.asarray(sampled), run.seed_key, following, round_index=r
            )
            if kind is not None:
                clients = panel if kind == 'panel' else np.arange(config.num_clients)
                evaluation = store_runner.evaluate_clients(state, clients)
            finite = store_runner.last_finite
        else:
            state, round_metrics = round_fn(state, run.train_data, sampled, run.seed_key)
            if kind is not None:  # testing may change the state (collapse_check='previous')
                state, evaluation = eval_fn(
                    state, run.test_data, **({'panel': panel} if kind == 'panel' else {})
                )
            finite = _finite_report(run.method, state, sampled)
        masks = None
        if r + 1 in sparsity_rounds:
            if stored:  # a chunk of clients at a time
                masks = store_runner.map_clients(
                    state,
                    lambda chunk, ids: _first_layer_masks(*run.method.client_variables(chunk)[:2]),
                )
            else:
                params, thresholds, _ = run.method.client_variables(state)
                masks = _first_layer_masks(params, thresholds)
        pending = (r, sampled, round_metrics, evaluation, finite, masks)
        return state, pending

    def process(pending) -> None:
        """The host's part of a round, once its results are there: checks, totals, records."""
        r, sampled, round_metrics, evaluation, finite, masks = pending
        evaluate_now = evaluation is not None
        round_metrics, evaluation, finite, masks = execution.host_local(
            (round_metrics, evaluation, finite, masks)
        )
        if masks is not None:
            masks = masks[: config.num_clients]  # no phantom clients
        # From the end of the previous round's host work (its figures are not this round's time).
        round_seconds.append(time.time() - clock[0])

        bad = [
            part
            for part, ok in (
                ('loss', np.isfinite(round_metrics['train_loss'])),
                *finite.items(),
            )
            if not ok
        ]
        failure = None
        if bad:
            failure = (
                f'round {r + 1}: non-finite {", ".join(bad)} (sampled clients '
                f'{np.asarray(sampled).tolist()}); the last good checkpoint in '
                f'{checkpointer.directory} is intact. Lower config.lr or set '
                'config.clip.'
            )
        elif float(round_metrics['train_loss']) > max_loss:
            failure = (
                f'round {r + 1}: training loss '
                f'{float(round_metrics["train_loss"]):.3g} is above '
                f'config.max_loss={max_loss:g}: the run diverged (sampled clients '
                f'{np.asarray(sampled).tolist()}); the last good checkpoint in '
                f'{checkpointer.directory} is intact. Lower config.lr or '
                'config.th_coeff, or set config.clip.'
            )
        if failure:
            if lead:
                reporting.write_json_atomic(
                    os.path.join(workdir, DIVERGED_FILENAME),
                    {'round': r + 1, 'error': failure},
                )
            raise NonFiniteError(failure)
        totals['bits_up'] += bits_up_round
        totals['bits_down'] += bits_down_round
        totals['flops'] += float(round_metrics['flops'])
        totals['steps'] += float(round_metrics['local_steps'])
        totals['max_steps'] += float(round_metrics['max_steps'])
        timer.add(round_seconds[-1], evaluated=evaluate_now)
        if masks is not None:
            sparsity[str(r + 1)] = _pack_masks(masks)
            if lead:
                _draw_sparsity(workdir, names[0], r + 1, sparsity[str(r + 1)])
        if evaluate_now:
            record = {
                'round': r + 1,
                'evaluated_clients': int(len(evaluation['counts'])),
                **metrics_lib.accuracy_summary(evaluation['correct'], evaluation['counts']),
                **metrics_lib.density_summary(
                    evaluation['layer_density'],
                    evaluation['kept_weights'],
                    masked_weights=masked_weights,
                    layer_names=names,
                ),
                'bits_up': totals['bits_up'],
                'bits_down': totals['bits_down'],
                'bits_dense_equivalent': dense_bits_round * (r + 1),
                'flops': totals['flops'] / config.num_clients,
                'train_loss': float(round_metrics['train_loss']),
                'useful_step_fraction': totals['steps'] / max(totals['max_steps'], 1.0),
            }
            try:
                if lead:
                    writer.write_scalars(
                        record['round'], {k: v for k, v in record.items() if k != 'round'}
                    )
            except OSError as e:
                raise _disk_error(e, workdir, reporting.METRICS_FILENAME) from None
            records.append(record)
            logging.info(
                'round %d/%d | accuracy %.2f%% | density %.2f%% (weights %.2f%%) '
                '| up %s down %s | loss %.3f | %.2fs',
                r + 1,
                config.rounds,
                100 * record['accuracy'],
                100 * record['density'],
                100 * record['density_weighted'],
                console_lib.format_bits(record['bits_up']),
                console_lib.format_bits(record['bits_down']),
                record['train_loss'],
                round_seconds[-1],
            )
            console.round_line(r + 1, config.rounds, record, timer.per_round())
        clock[0] = time.time()

    if start_round < config.rounds:
        console.line(f'round {start_round + 1} compiles (and the first evaluation)')
    clock = [time.time()]
    try:
        with PreemptionWatcher() as preemption:
            # The host takes round r's results while round r + 1 runs: it never waits for the
            # device between rounds, except where a checkpoint needs the state checked.
            pending, compiled = None, set()
            for r in range(start_round, config.rounds):
                kind = evaluation_kind(r)
                if pending is not None and kind is not None and kind not in compiled:
                    process(pending)  # first: its time would include this round's compilation
                    pending = None
                compiled.add(kind)
                state, current = dispatch(r, state)
                if pending is not None:
                    process(pending)
                pending = current
                # Every process must take the same branch: a signal that reached one stops all.
                preempted = execution.any_process(bool(preemption.received))
                if (r + 1) % config.checkpoint_every == 0 or preempted:
                    process(pending)
                    pending = None
                    save_checkpoint(r + 1)
                if preempted:
                    raise Preempted(preemption.received or signal.SIGTERM, r + 1, workdir)
            if pending is not None:
                process(pending)
            if not checkpointer.steps() or checkpointer.steps()[-1] != config.rounds:
                save_checkpoint(config.rounds)
    finally:
        if writer is not None:
            writer.close()
        checkpointer.close()
        if stored:
            store_runner.close()

    host_state = runner.unpadded(execution.host_local(state))
    try:
        final = records[-1]
        # Steady rounds of the whole run (compiling rounds left out, resumes included); a run too
        # short to have one reports the mean of what it ran.
        per_round = timer.per_round()
        if per_round != per_round and round_seconds:
            per_round = float(np.mean(round_seconds))
        summary = {
            **final,
            'rounds': config.rounds,
            'num_thresholds': num_thresholds,
            'masked_weights': masked_weights,
            'num_params': num_params,
            'seconds_first_round': timer.first if timer.first is not None else float('nan'),
            'seconds_per_round': per_round,
        }
        timings = ('seconds_first_round', 'seconds_per_round')
        if previous_summary is not None and not round_seconds:
            # Nothing ran now: the timings measured when the run did are kept, if everything
            # else in the old summary is what the checkpoint and the metrics say.
            if _without(previous_summary, timings) == _without(
                reporting.json_ready(summary), timings
            ):
                summary = previous_summary
            else:
                logging.warning(
                    '%s does not match the metrics of the run; it is written again.', summary_path
                )
        if lead:
            if not stored:  # a store's clients are in its files (CLIENTS_DIRNAME)
                save_final_state(
                    os.path.join(workdir, 'final_state.msgpack'), host_state, run.method
                )
            reporting.write_json_atomic(summary_path, summary)
            # Figures are derived files: drawn again from the metrics and the checkpointed masks
            # (a file that already shows the same is left untouched).
            reporting.plot_metrics(records, workdir)
            for round_, packed in sorted(sparsity.items(), key=lambda item: int(item[0])):
                _draw_sparsity(workdir, names[0], int(round_), packed)
    except OSError as e:
        raise _disk_error(e, workdir, 'the summary and figures') from None
    console.line(
        f'done: accuracy {100 * summary["accuracy"]:.2f}%, density {100 * summary["density"]:.2f}%'
        f', sent {console_lib.format_bits(summary["bits_up"] + summary["bits_down"])}, '
        f'{summary["seconds_per_round"]:.2f} s/round; results in {workdir}'
    )
    return summary
