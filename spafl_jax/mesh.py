"""The `clients` device mesh: the client axis sharded over every device (padded with phantom
clients to a whole number per device), a state created where it lives, and the collectives that
move a round's sampled clients from their owners to the devices that train them and back."""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

CLIENTS = 'clients'  # the mesh axis the client dimension is sharded along


def make_mesh(num_clients: int, devices=None) -> Mesh:
    """A 1-D mesh over the `clients` axis: every device, or one per client when there are fewer.

    The client axis is padded to a whole number of clients per device with phantom clients that
    are never sampled and never reported (`execution.RoundRunner.padded_clients`), so 100 clients use all 8
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
    compiled call whose outputs are laid out as `execution.RoundRunner.state_sharding` (clients padded with
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


def gather_sampled(local_clients, sampled, per_shard: int):
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


def scatter_sampled(local_clients, sampled, trained, per_shard: int):
    """Writes the trained clients (this device's share) back to their owners' shards."""
    everyone = jax.tree.map(lambda x: jax.lax.all_gather(x, CLIENTS, tiled=True), trained)
    local = sampled - jax.lax.axis_index(CLIENTS) * per_shard
    owned = (local >= 0) & (local < per_shard) & (sampled >= 0)
    index = jnp.where(owned, local, per_shard)  # out of range: dropped
    return jax.tree.map(lambda x, v: x.at[index].set(v, mode='drop'), local_clients, everyone)
