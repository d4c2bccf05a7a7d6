"""The clients' data on the device: the examples once, and each client's indices into them, drawn
by the Dirichlet split (`data.dirichlet_split`)."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from spafl_jax import data as data_lib


@flax.struct.dataclass
class ClientData:
    """A split dataset on the device: examples once, and each client's indices into them."""

    images: jax.Array  # [n, h, w, c], stored dtype (uint8 for image datasets)
    labels: jax.Array  # [n] int32
    example_ids: jax.Array  # [num_clients, max_count] int32, padded with 0
    counts: jax.Array  # [num_clients] int32


def make_client_data(images: np.ndarray, labels: np.ndarray, client_indices) -> ClientData:
    """Packs per-client index lists into a padded `[clients, max_count]` table (host -> device once)."""
    counts = np.array([len(ids) for ids in client_indices], np.int32)
    table = np.zeros((len(client_indices), max(int(counts.max()), 1)), np.int32)
    for k, ids in enumerate(client_indices):
        table[k, : len(ids)] = ids
    return ClientData(
        images=jnp.asarray(images),
        labels=jnp.asarray(labels, jnp.int32),
        example_ids=jnp.asarray(table),
        counts=jnp.asarray(counts),
    )


def split_clients(
    dataset, num_clients: int, *, alpha: float, min_train_examples: int, seed: int = 0
) -> tuple[ClientData, ClientData]:
    """(train, test) client data of `dataset` (a `data.Dataset`) split by `data.dirichlet_split`."""
    train_ids, test_ids = data_lib.dirichlet_split(
        dataset.train_labels,
        dataset.test_labels,
        num_clients=num_clients,
        alpha=alpha,
        min_train_examples=min_train_examples,
        seed=seed,
        num_classes=dataset.num_classes,
    )
    return (
        make_client_data(dataset.train_images, dataset.train_labels, train_ids),
        make_client_data(dataset.test_images, dataset.test_labels, test_ids),
    )
