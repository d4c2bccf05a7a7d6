"""The client stores' tiers (see `store`, which runs rounds over them): which runs may keep their
clients off the devices (`refusal`), a client split into what is stored (`heavy`) and what stays on
the devices (`light`), one client as one float32 row (`Layout`), and the stores behind the same
`read(ids)` / `write(ids, rows)` interface: `HostStore` in this process's memory and `DiskStore`,
a tensorstore zarr array with one chunk (one file) per client.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from spafl_jax.client import ClientState

TIERS = ('device', 'host', 'disk')


def refusal(
    tier: str,
    *,
    method: str = 'spafl',
    importance_update: str = 'all_after',
    lazy_importance: bool = True,
    collapse_check: str = 'current',
    multi_process: bool = False,
) -> str | None:
    """Why the clients cannot live in `tier` ('host' or 'disk') for this run, or None: the one
    place of these rules (`configuration` checks a config with it before anything compiles,
    `make_store_runner` its arguments)."""
    store = f'config.client_store={tier!r}'
    if method != 'spafl':
        return (
            f"{store} keeps SpaFL's clients; config.method={method!r} keeps them on the "
            "devices: set config.client_store='device'."
        )
    if importance_update == 'all_after' and not lazy_importance:
        return (
            f"{store} with importance_update='all_after' needs config.lazy_importance=True: the "
            "eager update rewrites every client's weights every round."
        )
    if collapse_check == 'previous':
        return (
            f"{store}: collapse_check='previous' changes the clients when they are tested, "
            "which happens in place only: set config.client_store='device'."
        )
    if multi_process:
        return (
            f'{store} keeps the clients in one process: a multi-host run keeps them on the '
            "devices (config.client_store='device')."
        )
    return None


# ------------------------------------------------------------------------------------------------
# Splitting a client in two.


def heavy(clients: ClientState) -> ClientState:
    """What a store keeps: everything but the lazy update's row sums and shifts."""
    return clients.replace(row_sums=(), shifts=())


def light(clients: ClientState) -> ClientState:
    """What stays on the devices for every client: the lazy update's row sums and shifts."""
    return ClientState(
        params=(),
        thresholds=(),
        batch_stats=(),
        opt_state=(),
        collapsed=(),
        row_sums=clients.row_sums,
        shifts=clients.shifts,
    )


def merge(stored: ClientState, resident: ClientState) -> ClientState:
    return stored.replace(row_sums=resident.row_sums, shifts=resident.shifts)


class Layout:
    """One client's stored state as one float32 row: `ravel` and `unravel` on the host.

    Every leaf is float32, bfloat16 or bool (exact in float32). The row starts with a flag, 1 for a
    stored client: a row of zeros (never written, a store's fill value) is a client that never
    trained.
    """

    def __init__(self, one_client):
        leaves, self.treedef = jax.tree.flatten(one_client)
        for leaf in leaves:
            dtype = np.dtype(leaf.dtype)
            if dtype != np.bool_ and dtype.kind != 'f' or dtype.itemsize > 4:
                raise ValueError(
                    f'a stored client holds a {dtype} leaf; only float32, bfloat16 and bool '
                    'leaves are exact as float32 rows.'
                )
        self.shapes = [tuple(leaf.shape) for leaf in leaves]
        self.dtypes = [np.dtype(leaf.dtype) for leaf in leaves]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.offsets = np.concatenate([[1], 1 + np.cumsum(self.sizes)]).astype(int)
        self.width = int(self.offsets[-1])  # the flag, then every leaf

    def ravel(self, clients) -> np.ndarray:
        """`[k, ...]` clients (host or device arrays) -> `[k, width]` rows, flagged as stored."""
        leaves = jax.tree.leaves(clients)
        k = leaves[0].shape[0] if leaves else 0
        rows = np.empty((k, self.width), np.float32)
        rows[:, 0] = 1.0
        for leaf, a, b in zip(leaves, self.offsets[:-1], self.offsets[1:]):
            rows[:, a:b] = np.asarray(leaf, np.float32).reshape(k, -1)
        return rows

    def unravel(self, rows: np.ndarray):
        """`[k, width]` rows -> `[k, ...]` host clients in their own dtypes."""
        k = rows.shape[0]
        leaves = [
            rows[:, a:b].reshape(k, *shape).astype(dtype)
            for a, b, shape, dtype in zip(
                self.offsets[:-1], self.offsets[1:], self.shapes, self.dtypes
            )
        ]
        return jax.tree.unflatten(self.treedef, leaves)


# ------------------------------------------------------------------------------------------------
# The tiers.


class HostStore:
    """Clients in this process's memory: one `[N, width]` float32 array. Its pages are touched only
    when a client is first written, so it holds (in resident memory) only the clients that trained.
    """

    tier = 'host'

    def __init__(self, layout: Layout, num_clients: int):
        self.layout, self.num_clients = layout, num_clients
        self.rows = np.zeros((num_clients, layout.width), np.float32)

    def read(self, ids: np.ndarray) -> np.ndarray:
        return self.rows[ids]

    def write(self, ids: np.ndarray, rows: np.ndarray, tag: int = 0) -> None:
        del tag  # nothing outlives the process: no journal
        self.rows[ids] = rows

    def bytes_used(self) -> int:
        return int(np.count_nonzero(self.rows[:, 0])) * self.layout.width * 4

    def close(self) -> None:
        pass


class DiskStore:
    """Clients on disk: a tensorstore zarr array `[N, width]` in `directory`, one chunk (one file of
    `width` float32 numbers) per client, written only once a client has trained. Opening an existing
    directory of the same shape continues with what it holds.

    It doubles as the clients' checkpoint. Every write first saves the rows it replaces in an undo
    journal (`journal/`, one file per write, tagged with the round it belongs to, renamed into place
    once complete), so a run resumed from its checkpoint of round R takes the store back to round R
    (`rollback(R)`) whatever was written after it; `commit(R)` drops the journal up to round R once
    nothing will be resumed from before R.
    """

    tier = 'disk'
    JOURNAL = 'journal'

    def __init__(self, layout: Layout, num_clients: int, directory: str):
        import tensorstore as ts  # pylint: disable=g-import-not-at-top

        self.layout, self.num_clients, self.directory = layout, num_clients, directory
        os.makedirs(directory, exist_ok=True)
        self.array = ts.open(
            {
                'driver': 'zarr',
                'kvstore': {'driver': 'file', 'path': directory},
                'metadata': {
                    'shape': [num_clients, layout.width],
                    'chunks': [1, layout.width],
                    'dtype': '<f4',
                    'fill_value': 0.0,
                    'compressor': None,
                    'dimension_separator': '.',
                },
            },
            create=True,
            open=True,
        ).result()

    def read(self, ids: np.ndarray) -> np.ndarray:
        if len(ids) and np.all(np.diff(ids) == 1):  # a contiguous range: one slice
            return self.array[int(ids[0]) : int(ids[-1]) + 1].read().result()
        return self.array[np.asarray(ids, np.int64)].read().result()

    def write(self, ids: np.ndarray, rows: np.ndarray, tag: int = 0) -> None:
        ids = np.asarray(ids, np.int64)
        self._journal(ids, tag)
        self.array[ids].write(rows).result()

    # -- the undo journal ---------------------------------------------------------------------

    def _journal_entries(self) -> list[tuple[int, int, str]]:
        """(sequence, tag, path) of the journal's complete entries, oldest first."""
        directory = os.path.join(self.directory, self.JOURNAL)
        if not os.path.isdir(directory):
            return []
        entries = []
        for name in os.listdir(directory):
            parts = name[: -len('.npz')].split('_') if name.endswith('.npz') else []
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                entries.append((int(parts[0]), int(parts[1]), os.path.join(directory, name)))
        return sorted(entries)

    def _journal(self, ids: np.ndarray, tag: int) -> None:
        directory = os.path.join(self.directory, self.JOURNAL)
        os.makedirs(directory, exist_ok=True)
        entries = self._journal_entries()
        sequence = entries[-1][0] + 1 if entries else 0
        path = os.path.join(directory, f'{sequence:09d}_{int(tag):09d}.npz')
        with open(path + '.tmp', 'wb') as f:
            np.savez(f, ids=ids, rows=self.array[ids].read().result())
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + '.tmp', path)

    def rollback(self, tag: int) -> int:
        """Undoes every write tagged after round `tag`, newest first, and empties the journal.
        Returns how many writes were undone."""
        undone = 0
        for _, entry_tag, path in reversed(self._journal_entries()):
            if entry_tag > tag:
                with np.load(path) as saved:
                    self.array[saved['ids']].write(saved['rows']).result()
                undone += 1
        self.commit(2**62)
        return undone

    def commit(self, tag: int) -> None:
        """Drops the journal of the writes tagged up to round `tag` (and unfinished entries)."""
        directory = os.path.join(self.directory, self.JOURNAL)
        for _, entry_tag, path in self._journal_entries():
            if entry_tag <= tag:
                os.remove(path)
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                if name.endswith('.tmp'):
                    os.remove(os.path.join(directory, name))

    def bytes_used(self) -> int:
        """Bytes of the clients' files (the journal not included)."""
        total = 0
        for entry in os.scandir(self.directory):
            if entry.is_file() and not entry.name.startswith('.'):
                total += entry.stat().st_size
        return total

    def close(self) -> None:
        pass


def open_store(tier: str, layout: Layout, num_clients: int, directory: str | None = None):
    if tier == 'host':
        return HostStore(layout, num_clients)
    if tier == 'disk':
        if not directory:
            raise ValueError("client_store='disk' needs a directory for the clients' files.")
        return DiskStore(layout, num_clients, directory)
    raise ValueError(f"client_store={tier!r} is not a store; use 'host' or 'disk'.")
