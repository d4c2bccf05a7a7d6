"""Datasets as in-memory numpy arrays: `load_dataset` finds one on this machine (or downloads it),
`load_digits` is the embedded one, and `dirichlet_split` is the non-IID client split.

Everything here is plain numpy (docs/algorithm.md, section 4): the loaders return uint8 NHWC images
and int32 labels; scaling, normalization and augmentation happen later, on device. The `Dataset` type
and the readers of the files (IDX, CIFAR's binary archives, prepared tensorflow-datasets data, none
needing TensorFlow) are in `dataset_files`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from spafl_jax import downloads

# The `Dataset` type and the file readers, in `dataset_files`; they are part of this module's API.
from spafl_jax.dataset_files import (  # noqa: F401
    Dataset,
    DatasetUnavailableError,
    _find_idx_files,
    _make_dataset,
    _tfds_data_dir,
    _tfds_prepare_hint,
    load_cifar_archive,
    load_fashion_mnist_idx,
    load_tfds,
    read_idx,
)

DATASETS = ('digits', 'fashion_mnist', 'cifar10', 'cifar100')

# Debian's `dataset-fashion-mnist` package installs the four IDX files here.
DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_DIRS = (DEBIAN_FASHION_MNIST,)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits: the embedded dataset that runs anywhere.


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 1797 real 8x8 handwritten digits (values 0..16), split stratified by class."""
    import sklearn.datasets  # pylint: disable=g-import-not-at-top
    import sklearn.model_selection  # pylint: disable=g-import-not-at-top

    digits = sklearn.datasets.load_digits()
    # The pixel values are integer counts 0..16 stored as float64; uint8 keeps them exactly.
    images = digits.images.astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    train_idx, test_idx = sklearn.model_selection.train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return _make_dataset(
        'digits',
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        pixel_max=16.0,
    )


# ---------------------------------------------------------------------------------------------
# Dispatch.


def load_dataset(
    name: str, data_dir: str | None = None, *, download: bool = False, mirror: str | None = None
) -> Dataset:
    """Loads one of `DATASETS` from wherever it is on this machine, or downloads it.

    fashion_mnist is looked for as IDX files (in `data_dir`, `data_dir/fashion_mnist`,
    `data_dir/fashion-mnist`, `FASHION_MNIST_DIRS`, and the download folder), cifar10 and cifar100
    as their binary archive in `<root>/<name>/`, and both then as prepared tfds data in `data_dir`.
    `<root>` is `data_dir`, or `downloads.default_root()` without one. With `download`, what is
    still missing is fetched from the published archives (or `mirror`) into `<root>/<name>/`,
    checked against their digests; otherwise, or offline, DatasetUnavailableError lists the places
    looked in and how to provide the files.
    """
    if name not in DATASETS:
        raise ValueError(f'Unknown dataset {name!r}; allowed values: {", ".join(DATASETS)}.')
    if name == 'digits':
        return load_digits()
    root = os.path.abspath(os.path.expanduser(data_dir)) if data_dir else downloads.default_root()
    target = os.path.join(root, name)
    looked_in = []
    if name == 'fashion_mnist':
        idx_dirs = []
        if data_dir:
            idx_dirs += [data_dir] + [
                os.path.join(data_dir, d) for d in ('fashion_mnist', 'fashion-mnist')
            ]
        else:
            idx_dirs.append(target)
        idx_dirs += list(FASHION_MNIST_DIRS)
        for directory in idx_dirs:
            looked_in.append(f'IDX files in {directory}')
            if _find_idx_files(directory) is not None:
                return load_fashion_mnist_idx(directory)
    else:
        archive = os.path.join(target, downloads.SOURCES[name][0].filename)
        looked_in.append(f'the archive {archive}')
        if os.path.exists(archive):
            try:
                downloads.fetch(downloads.SOURCES[name][0], target)  # verifies; never downloads
            except downloads.DownloadError as e:
                raise DatasetUnavailableError(f'{name}: {e}') from None
            return load_cifar_archive(name, archive)
    tfds_dir = _tfds_data_dir(data_dir)
    looked_in.append(f'tensorflow-datasets data in {os.path.join(tfds_dir, name)}')
    try:
        return load_tfds(name, data_dir)
    except DatasetUnavailableError as e:
        tfds_problem = e
    urls = ', '.join(downloads.url_of(a, mirror) for a in downloads.SOURCES[name])
    provide = (
        f'download {urls} into {target}, or prepare tensorflow-datasets data '
        f'({_tfds_prepare_hint(name, tfds_dir)})'
    )
    if name == 'fashion_mnist':
        provide = (
            'install it with `sudo apt-get install dataset-fashion-mnist` (IDX files in '
            f'{DEBIAN_FASHION_MNIST}), ' + provide
        )
    if download:
        try:
            downloads.download(name, target, mirror=mirror)
        except downloads.DownloadError as e:
            raise DatasetUnavailableError(
                f'{name} is not on this machine (looked for '
                + '; '.join(looked_in)
                + f') and the download failed: {e} To provide it offline, '
                + provide
            ) from e
        if name == 'fashion_mnist':
            return load_fashion_mnist_idx(target)
        return load_cifar_archive(name, os.path.join(target, downloads.SOURCES[name][0].filename))
    raise DatasetUnavailableError(
        f'{name} is not available (looked for ' + '; '.join(looked_in) + ') and downloads are '
        'off; turn them on (config.download=True), ' + provide
    ) from tfds_problem


# ---------------------------------------------------------------------------------------------
# Dirichlet non-IID split (docs/algorithm.md, section 4).


def dirichlet_split(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    *,
    alpha: float,
    min_train_examples: int,
    seed: int,
    num_classes: int | None = None,
    max_attempts: int = 1000,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Splits train and test sets across clients with per-class Dirichlet(alpha) proportions.

    Per class c, one draw p ~ Dir(alpha * 1_N) splits both c's (shuffled) training examples and
    c's test examples, so each client's test set follows its training distribution. The whole
    split is redrawn until every client has at least `min_train_examples` training examples.

    Args:
      train_labels: [n_train] integer labels.
      test_labels: [n_test] integer labels.
      num_clients: N, number of clients.
      alpha: Dirichlet concentration; small values give skewed clients.
      min_train_examples: each client needs at least this many training examples (the batch size).
      seed: seed of the numpy generator; the result is a deterministic function of the inputs.
      num_classes: defaults to 1 + the largest label.
      max_attempts: how many whole splits to draw before giving up.

    Returns:
      (train_indices, test_indices): two lists of N sorted int64 index arrays into the train and
      test sets; each list is a disjoint cover of its set.

    Raises:
      ValueError: if no split with enough examples per client was found.
    """
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    if num_clients < 1 or alpha <= 0:
        raise ValueError(f'Need num_clients >= 1 and alpha > 0, got {num_clients} and {alpha}.')
    if num_classes is None:
        num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
    if num_clients * min_train_examples > len(train_labels):
        raise ValueError(
            f'{num_clients} clients x {min_train_examples} examples exceeds the '
            f'{len(train_labels)} training examples: use fewer clients or a smaller batch size.'
        )
    train_by_class = [np.flatnonzero(train_labels == c) for c in range(num_classes)]
    test_by_class = [np.flatnonzero(test_labels == c) for c in range(num_classes)]

    rng = np.random.default_rng(seed)
    for _ in range(max_attempts):
        train_parts = [[] for _ in range(num_clients)]
        test_parts = [[] for _ in range(num_clients)]
        for c in range(num_classes):
            p = rng.dirichlet(np.full(num_clients, alpha))
            for by_class, parts in ((train_by_class, train_parts), (test_by_class, test_parts)):
                idx = rng.permutation(by_class[c])
                # The last boundary is dropped so rounding of cumsum(p)[-1] can never lose the tail.
                bounds = (np.cumsum(p) * len(idx)).astype(int)[:-1]
                for client, chunk in enumerate(np.split(idx, bounds)):
                    parts[client].append(chunk)
        sizes = [sum(len(chunk) for chunk in parts) for parts in train_parts]
        if min(sizes) >= min_train_examples:

            def finish(parts: Sequence[list[np.ndarray]]) -> list[np.ndarray]:
                return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]

            return finish(train_parts), finish(test_parts)
    raise ValueError(
        f'No Dirichlet(alpha={alpha}) split of {len(train_labels)} training examples gave all '
        f'{num_clients} clients >= {min_train_examples} examples in {max_attempts} attempts: '
        'too many clients or too small alpha for this data (or lower the batch size).'
    )
