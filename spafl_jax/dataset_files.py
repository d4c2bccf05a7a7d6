"""The in-memory `Dataset` and the readers that build one with numpy from files on disk:
Fashion-MNIST's IDX files, CIFAR's binary archives and prepared tensorflow-datasets data.

`data.load_dataset` decides which reader to use; TensorFlow is never required (tfds data is read
from ArrayRecord files through `builder.as_data_source`, which decodes with numpy and Pillow).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import os
import tarfile

import numpy as np

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
