"""Checkpoints of a whole federated run (orbax), verified on restore, and preemption signals.

A checkpoint holds every client's state, the server thresholds and delta, the round, and the host-side
running totals. Randomness derives from (seed, round, client id), so nothing else is needed for a
resumed run to continue bit for bit. Each checkpoint carries a SHA-256 of its arrays and its
progress record: a newest checkpoint that is torn or corrupt in any field is detected, set aside
in `<directory>.unusable/`, and the previous one used.

Without the digest (`Checkpointer(digest=False)`, for states too large to gather on one host), the
state is saved as it lies on the devices, each process writing its own shards, asynchronously (the
save returns once the arrays are off the devices), and restored straight onto the target's sharding;
a checkpoint of another layout (another device count) is restored through the host instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from typing import Any

from absl import logging
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp


def state_digest(tree, progress: dict[str, Any] | None = None) -> str:
    """SHA-256 over every leaf's dtype, shape and bytes, in pytree order, and over `progress` (the
    round and the running totals, without its own 'digest'), so that no field goes unverified."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        leaf = np.asarray(leaf)
        h.update(f'{leaf.dtype}{leaf.shape}'.encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    if progress is not None:
        fields = {k: v for k, v in progress.items() if k != 'digest'}
        h.update(json.dumps(fields, sort_keys=True).encode())
    return h.hexdigest()


class _quiet_orbax:  # noqa: N801  (used as a statement: `with _quiet_orbax():`)
    """Orbax logs every save at INFO through absl; keep the run's own progress lines readable."""

    def __enter__(self):
        self._level = logging.get_verbosity()
        logging.set_verbosity(logging.WARNING)

    def __exit__(self, *exc):
        logging.set_verbosity(self._level)
        return False


class Checkpointer:
    """Saves and restores `(state, progress)` under `directory`, keeping the newest `max_to_keep`."""

    def __init__(self, directory: str, max_to_keep: int = 2, digest: bool = True):
        self.directory = os.path.abspath(directory)
        self.digest = digest
        with _quiet_orbax():
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=max_to_keep,
                    create=True,
                    enable_async_checkpointing=not digest,
                    cleanup_tmp_directories=True,
                ),
                # Handlers named up front: a fresh manager can then read a checkpoint's metadata.
                item_handlers={
                    'state': ocp.StandardCheckpointHandler(),
                    'progress': ocp.JsonCheckpointHandler(),
                },
            )

    def save(self, step: int, state, progress: dict[str, Any]) -> None:
        # Through JSON, as the restore will read it (tuples become lists, keys strings).
        progress = json.loads(json.dumps(progress))
        if not self.digest:  # the arrays as they lie, each process its shards; returns early
            with _quiet_orbax():
                self._manager.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                        progress=ocp.args.JsonSave(progress),
                    ),
                    force=True,
                )
            return
        host_state = jax.tree.map(np.asarray, flax.serialization.to_state_dict(state))
        progress = {**progress, 'digest': state_digest(host_state, progress)}
        with _quiet_orbax():
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(host_state), progress=ocp.args.JsonSave(progress)
                ),
                force=True,
            )
            self._manager.wait_until_finished()

    def wait(self) -> None:
        """Until the last save is complete on disk."""
        with _quiet_orbax():
            self._manager.wait_until_finished()

    def steps(self) -> list[int]:
        self.wait()
        with _quiet_orbax():
            self._manager.reload()
            return sorted(self._manager.all_steps())

    def _abstract(self, step: int, target_dict):
        """What to restore `step` as: the target's shapes on the target's sharding, or host
        arrays of the saved shapes where they differ (saved on another device count)."""
        saved = [
            tuple(m.shape) for m in jax.tree.leaves(self._manager.item_metadata(step)['state'])
        ]
        leaves, treedef = jax.tree.flatten(target_dict)
        if saved == [tuple(np.shape(x)) for x in leaves]:
            return jax.tree.unflatten(
                treedef,
                [
                    jax.ShapeDtypeStruct(
                        np.shape(x), x.dtype, sharding=getattr(x, 'sharding', None)
                    )
                    for x in leaves
                ],
            )
        if len(saved) != len(leaves):
            raise ValueError(f'it holds {len(saved)} arrays where the run has {len(leaves)}')
        return jax.tree.unflatten(
            treedef, [np.zeros(shape, x.dtype) for shape, x in zip(saved, leaves)]
        )

    def restore_latest(self, target):
        """(state, progress) of the newest checkpoint that restores and verifies, or None.

        `target` is a state of the right structure (e.g. a freshly initialized one).
        """
        target_dict = flax.serialization.to_state_dict(target)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), target_dict)
        for step in reversed(self.steps()):
            try:
                with _quiet_orbax():
                    restored = self._manager.restore(
                        step,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(
                                abstract if self.digest else self._abstract(step, target_dict)
                            ),
                            progress=ocp.args.JsonRestore(),
                        ),
                    )
                progress = dict(restored['progress'])
                if self.digest:
                    host_state = jax.tree.map(np.asarray, restored['state'])
                    if progress.get('digest') != state_digest(host_state, progress):
                        raise ValueError('its contents do not match the digest written with them')
                else:
                    host_state = restored['state']  # on the devices, or host arrays
                if progress.get('round') != step:
                    raise ValueError(f'it says round {progress.get("round")!r}')
            except Exception as e:  # pylint: disable=broad-except
                logging.warning(
                    'checkpoint %d in %s is unusable (%s: %s); it is set aside in '
                    '%s and an older one used.',
                    step,
                    self.directory,
                    type(e).__name__,
                    str(e)[:200],
                    self.unusable_directory,
                )
                self._set_aside(step)
                continue
            return flax.serialization.from_state_dict(target, host_state), progress
        return None

    @property
    def unusable_directory(self) -> str:
        return self.directory + '.unusable'

    def _set_aside(self, step: int) -> None:
        """Moves an unusable checkpoint out of orbax's sight, so that the round it held can be
        computed and saved again (and nothing written is deleted). Process 0 moves it; the others
        skip it as unusable too."""
        if jax.process_index() == 0:
            source = os.path.join(self.directory, str(step))
            target = os.path.join(self.unusable_directory, str(step))
            suffix = 1
            while os.path.exists(target):
                target = os.path.join(self.unusable_directory, f'{step}.{suffix}')
                suffix += 1
            try:
                os.makedirs(self.unusable_directory, exist_ok=True)
                shutil.move(source, target)
            except OSError as e:
                logging.warning('checkpoint %d could not be set aside (%s).', step, e)
        with _quiet_orbax():
            self._manager.reload()

    def close(self) -> None:
        with _quiet_orbax():
            self._manager.close()


class PreemptionWatcher:
    """Records SIGTERM/SIGINT so the run can checkpoint at the next round boundary and stop."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        if self.received is not None and signum == signal.SIGINT:
            # A second Ctrl-C stops at once: one line, no traceback, no cleanup that could hang.
            # Every file is safe to leave as it is: metrics lines are single appends, a
            # checkpoint being written is a temporary directory the next run removes, and the
            # kernel releases the workdir lock.
            os.write(
                2,
                b'interrupted again: stopped at once, without a checkpoint of this round; '
                b'the same command resumes from the last one.\n',
            )
            os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access
        self.received = signum
        logging.warning(
            '%s received: saving a checkpoint at the end of this round, then stopping.',
            signal.Signals(signum).name,
        )

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
