"""A run's work directory: its lock, whether a recorded run may be resumed with a config, and the
errors that say why a workdir cannot be used.

Files of a workdir: config.json (the run's config), metrics.jsonl and tensorboard/ (the records),
checkpoints/, clients/ (a disk store's clients), summary.json, final_state.msgpack, diverged.json
and the figures.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket

from absl import logging
import ml_collections

from spafl_jax import configuration
from spafl_jax import reporting


class WorkdirError(RuntimeError):
    """The workdir cannot be used as asked; nothing in it was changed."""


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
    form never counts (a resumed run keeps its own: `keep_the_stored_form`); with `resuming`,
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


def keep_the_stored_form(config, workdir: str, overwrite: bool) -> None:
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


def disk_error(e: OSError, workdir: str, what: str) -> WorkdirError:
    reason = 'the disk is full' if e.errno == errno.ENOSPC else e.strerror or str(e)
    return WorkdirError(
        f'writing {what} in {workdir!r} failed: {reason}. Files already written '
        'are intact; free space and run the same command to resume.'
    )
