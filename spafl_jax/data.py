"""Datasets as in-memory numpy arrays, and the Dirichlet non-IID client split.

Everything here is plain numpy (docs/algorithm.md, section 4): the loaders return uint8 NHWC images and int32
labels; scaling, normalization and augmentation happen later, on device. TensorFlow is never
required: the canonical archives (`spafl_jax.downloads`: Fashion-MNIST's IDX files, CIFAR's binary
archives) are parsed here with numpy, and tensorflow-datasets data, where a user has it prepared,
is read from ArrayRecord files through `builder.as_data_source`, which decodes examples with numpy
and Pillow.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import os
import tarfile
from collections.abc import Sequence

import numpy as np

from spafl_jax import downloads

DATASETS = ('digits', 'fashion_mnist', 'cifar10', 'cifar100')

# Debian's `dataset-fashion-mnist` package installs the four IDX files here.
DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_DIRS = (DEBIAN_FASHION_MNIST,)

_TFDS_DATASETS = ('fashion_mnist', 'cifar10', 'cifar100')
_NUM_CLASSES = {'digits': 10, 'fashion_mnist': 10, 'cifar10': 10, 'cifar100': 100}

# The standard Fashion-MNIST / MNIST file names, without the optional `.gz` suffix.
_IDX_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}

# IDX type byte -> element type; IDX stores everything big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}


class DatasetUnavailableError(RuntimeError):
    """A dataset is not on this machine; the message says where we looked and how to get it."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: `==` on arrays is ambiguous.
class Dataset:
    """A whole dataset in memory.

    Attributes:
      name: one of `DATASETS`.
      train_images: [n_train, h, w, c] uint8, values in 0..pixel_max.
      train_labels: [n_train] int32 in 0..num_classes-1.
      test_images: [n_test, h, w, c] uint8.
      test_labels: [n_test] int32.
      num_classes: number of classes.
      pixel_max: value of a full-intensity pixel (255.0, or 16.0 for digits).
      mean: per-channel mean of `train_images / pixel_max`.
      std: per-channel standard deviation of `train_images / pixel_max`.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    pixel_max: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(h, w, c) of one image."""
        return tuple(self.train_images.shape[1:])


def _channel_stats(
    images: np.ndarray, pixel_max: float
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images, in units of `pixel_max`.

    A 256-bin histogram per channel gives exact moments without materializing a float copy of
    the dataset (CIFAR's train set would be 1.2 GB in float64).
    """
    means, stds = [], []
    values = np.arange(256, dtype=np.float64) / pixel_max
    for c in range(images.shape[-1]):
        counts = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float((counts * values).sum() / total)
        var = float((counts * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(float(np.sqrt(var)))
    return tuple(means), tuple(stds)


def _make_dataset(
    name: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    pixel_max: float = 255.0,
) -> Dataset:
    """Validates shapes and dtypes once, at the boundary, and computes mean/std."""
    train_images = np.ascontiguousarray(train_images, dtype=np.uint8)
    test_images = np.ascontiguousarray(test_images, dtype=np.uint8)
    train_labels = np.asarray(train_labels, dtype=np.int32)
    test_labels = np.asarray(test_labels, dtype=np.int32)
    if train_images.ndim != 4 or test_images.shape[1:] != train_images.shape[1:]:
        raise ValueError(
            f'{name}: expected [n, h, w, c] images with equal test/train shapes, got '
            f'{train_images.shape} and {test_images.shape}.'
        )
    if len(train_images) != len(train_labels) or len(test_images) != len(test_labels):
        raise ValueError(f'{name}: images and labels have different lengths.')
    mean, std = _channel_stats(train_images, pixel_max)
    return Dataset(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=_NUM_CLASSES[name],
        pixel_max=float(pixel_max),
        mean=mean,
        std=std,
    )


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
# Fashion-MNIST from IDX files (e.g. Debian's dataset-fashion-mnist package).


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, plain or gzip-compressed (detected from the content, not the name).

    No checksum is verified: Debian recompresses the files, so their .gz bytes differ from
    upstream while the decompressed arrays are identical.
    """
    with open(path, 'rb') as f:
        raw = f.read()
    if raw[:2] == b'\x1f\x8b':
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f'{path} is not an IDX file (magic bytes {raw[:4]!r}).')
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype='>u4', count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f'{path}: header says shape {shape} ({expected} bytes), file has {len(raw)}.'
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder('='))


def _find_idx_files(directory: str | os.PathLike) -> dict[str, str] | None:
    """The four Fashion-MNIST files in `directory` (each with or without .gz), or None."""
    found = {}
    for key, base in _IDX_FILES.items():
        for candidate in (base, base + '.gz'):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                found[key] = path
                break
        else:
            return None
    return found


def load_fashion_mnist_idx(directory: str | os.PathLike) -> Dataset:
    """Fashion-MNIST from the four standard IDX files in `directory`."""
    files = _find_idx_files(directory)
    if files is None:
        raise DatasetUnavailableError(
            f'fashion_mnist: {directory} does not hold all of '
            f'{", ".join(f"{b}[.gz]" for b in _IDX_FILES.values())}.'
        )
    arrays = {}
    for key, path in files.items():
        try:
            arrays[key] = read_idx(path)
        except (OSError, EOFError, ValueError) as e:  # gzip.BadGzipFile is an OSError
            raise DatasetUnavailableError(
                f'fashion_mnist: {path} cannot be read ({e}); replace it with the standard '
                f'Fashion-MNIST file.'
            ) from None
    for split in ('train', 'test'):
        images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
        problem = None
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            problem = (
                f'images of shape {images.shape} and type {images.dtype}, not [n, 28, 28] uint8'
            )
        elif labels.ndim != 1 or len(labels) != len(images):
            problem = f'{len(images)} images but labels of shape {labels.shape}'
        elif len(labels) and (labels.min() < 0 or labels.max() > 9):
            problem = f'labels from {labels.min()} to {labels.max()}, not 0..9'
        if problem:
            raise DatasetUnavailableError(
                f'fashion_mnist: the {split} files in {directory} hold {problem}; replace them '
                f'with the standard Fashion-MNIST files.'
            )
    return _make_dataset(
        'fashion_mnist',
        arrays['train_images'][..., None],
        arrays['train_labels'],
        arrays['test_images'][..., None],
        arrays['test_labels'],
    )


# ---------------------------------------------------------------------------------------------
# CIFAR from its binary archives: fixed-size records of label byte(s) then 3x32x32 pixels (CHW).

# Per dataset: (members of the training split, member of the test split, label bytes per record
# with the one SpaFL uses last: CIFAR-100's records are coarse label, fine label, pixels).
_CIFAR_MEMBERS = {
    'cifar10': (
        tuple(f'cifar-10-batches-bin/data_batch_{i}.bin' for i in range(1, 6)),
        'cifar-10-batches-bin/test_batch.bin',
        1,
    ),
    'cifar100': (('cifar-100-binary/train.bin',), 'cifar-100-binary/test.bin', 2),
}
_CIFAR_PIXELS = 3 * 32 * 32


def _cifar_records(raw: bytes, label_bytes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    record = label_bytes + _CIFAR_PIXELS
    if not raw or len(raw) % record:
        raise ValueError(
            f'{where}: {len(raw)} bytes is not a whole number of {record}-byte records'
        )
    table = np.frombuffer(raw, np.uint8).reshape(-1, record)
    images = table[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, table[:, label_bytes - 1].astype(np.int32)


def load_cifar_archive(name: str, path: str | os.PathLike) -> Dataset:
    """cifar10 / cifar100 from the published binary archive (`cifar-10-binary.tar.gz`, ...)."""
    if name not in _CIFAR_MEMBERS:
        raise ValueError(
            f'load_cifar_archive: unknown dataset {name!r}; allowed: cifar10, cifar100.'
        )
    train_members, test_member, label_bytes = _CIFAR_MEMBERS[name]
    wanted = set(train_members) | {test_member}
    raw = {}
    try:
        with tarfile.open(path, 'r:gz') as archive:
            for member in archive:
                if member.name in wanted and member.isfile():
                    raw[member.name] = archive.extractfile(member).read()
        missing = sorted(wanted - set(raw))
        if missing:
            raise ValueError(f'the archive has no {", ".join(missing)}')
        parts = [_cifar_records(raw[m], label_bytes, m) for m in train_members]
        test_images, test_labels = _cifar_records(raw[test_member], label_bytes, test_member)
        num_classes = _NUM_CLASSES[name]
        for labels in [p[1] for p in parts] + [test_labels]:
            if labels.max() >= num_classes:
                raise ValueError(f'labels up to {labels.max()}, not 0..{num_classes - 1}')
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:
        raise DatasetUnavailableError(
            f'{name}: {path} cannot be read as the binary CIFAR archive ({e}); replace it with '
            f'the published {os.path.basename(str(path))}.'
        ) from None
    return _make_dataset(
        name,
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        test_images,
        test_labels,
    )


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets, read without TensorFlow.


def _tfds_data_dir(data_dir: str | None) -> str:
    """`data_dir`, or tfds's own default, computed without importing tfds (same rule)."""
    if data_dir:
        return os.path.abspath(os.path.expanduser(data_dir))
    default = os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')
    return os.environ.get('TFDS_DATA_DIR', default)


def _tfds_prepare_hint(name: str, data_dir: str) -> str:
    return (
        f'to provide it, run `tfds build {name} --data_dir=/tmp/tfds '
        f'--file_format=array_record` on a machine with internet and TensorFlow, then copy '
        f'/tmp/tfds/{name} to {os.path.join(data_dir, name)} here (reading it needs no '
        f'TensorFlow).'
    )


def load_tfds(name: str, data_dir: str | None) -> Dataset:
    """fashion_mnist / cifar10 / cifar100 from tfds data already prepared in `data_dir`.

    Reads the ArrayRecord files through `builder.as_data_source`, which needs neither TensorFlow
    nor the network. A download is never attempted: offline, tfds would retry for minutes.
    """
    if name not in _TFDS_DATASETS:
        raise ValueError(f'load_tfds: unknown dataset {name!r}; allowed: {_TFDS_DATASETS}.')
    data_dir = _tfds_data_dir(data_dir)
    # Cheap filesystem check before importing tfds or building anything.
    dataset_dir = os.path.join(data_dir, name)
    prepared = sorted(glob.glob(os.path.join(dataset_dir, '*', 'dataset_info.json')))
    if not prepared:
        raise DatasetUnavailableError(
            f'{name}: no prepared tensorflow-datasets data in {data_dir} '
            f'(looked for {dataset_dir}/<version>/dataset_info.json). '
            + _tfds_prepare_hint(name, data_dir)
        )

    try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise DatasetUnavailableError(
            f'{name}: prepared data found in {dataset_dir} but tensorflow-datasets is not '
            f'installed ({e}); pip install tensorflow-datasets array_record pillow.'
        ) from e

    version = str(tfds.builder_cls(name).VERSION)
    if not os.path.isfile(os.path.join(dataset_dir, version, 'dataset_info.json')):
        found = [os.path.basename(os.path.dirname(p)) for p in prepared]
        raise DatasetUnavailableError(
            f'{name}: {dataset_dir} holds version(s) {found}, but the installed '
            f'tensorflow-datasets reads version {version}. ' + _tfds_prepare_hint(name, data_dir)
        )

    builder = tfds.builder(name, data_dir=data_dir)
    try:
        sources = builder.as_data_source(split=['train', 'test'])
    except (NotImplementedError, ValueError, FileNotFoundError) as e:
        # Typically data built with the default TFRecord format, which needs TensorFlow to read.
        raise DatasetUnavailableError(
            f'{name}: cannot read the data prepared in {dataset_dir} without TensorFlow ({e}). '
            + _tfds_prepare_hint(name, data_dir)
        ) from e

    arrays = []
    for source in sources:
        # Per-example reads: as fast as batched `__getitems__` here (PNG decoding dominates).
        examples = [source[i] for i in range(len(source))]
        images = np.stack([np.asarray(ex['image'], dtype=np.uint8) for ex in examples])
        # cifar100 also has 'coarse_label'; SpaFL uses the 100 fine classes in 'label'.
        labels = np.array([int(ex['label']) for ex in examples], dtype=np.int32)
        arrays.append((images, labels))
    (train_images, train_labels), (test_images, test_labels) = arrays
    return _make_dataset(name, train_images, train_labels, test_images, test_labels)


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
