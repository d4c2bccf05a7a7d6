"""Tests for spafl_jax.data: loaders on real and hand-written files, and the Dirichlet split."""

import gzip
import io
import os
import struct
import time

import numpy as np
import pytest

from spafl_jax import data


# ---------------------------------------------------------------------------------------------
# dirichlet_split


def _labels(n_per_class: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), n_per_class))


def test_dirichlet_split_is_deterministic():
    train, test = _labels(100, 10, 0), _labels(20, 10, 1)
    a = data.dirichlet_split(train, test, num_clients=8, alpha=0.5, min_train_examples=10, seed=3)
    b = data.dirichlet_split(train, test, num_clients=8, alpha=0.5, min_train_examples=10, seed=3)
    c = data.dirichlet_split(train, test, num_clients=8, alpha=0.5, min_train_examples=10, seed=4)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a[0], c[0]))


def test_dirichlet_split_partitions_train_and_test():
    train, test = _labels(100, 10, 0), _labels(30, 10, 1)
    train_parts, test_parts = data.dirichlet_split(
        train, test, num_clients=7, alpha=0.3, min_train_examples=16, seed=0
    )
    assert len(train_parts) == len(test_parts) == 7
    for parts, n in ((train_parts, len(train)), (test_parts, len(test))):
        joined = np.concatenate(parts)
        assert joined.dtype == np.int64
        assert len(joined) == n  # disjoint ...
        np.testing.assert_array_equal(np.sort(joined), np.arange(n))  # ... and covering.
        for p in parts:
            np.testing.assert_array_equal(p, np.sort(p))
    assert min(len(p) for p in train_parts) >= 16


def test_dirichlet_split_small_alpha_is_skewed_and_test_follows_train():
    num_classes = 10
    train, test = _labels(1000, num_classes, 0), _labels(500, num_classes, 1)
    train_parts, test_parts = data.dirichlet_split(
        train, test, num_clients=10, alpha=0.1, min_train_examples=32, seed=0
    )
    dominant_share, argmax_match = [], []
    for tr, te in zip(train_parts, test_parts):
        train_counts = np.bincount(train[tr], minlength=num_classes)
        test_counts = np.bincount(test[te], minlength=num_classes)
        dominant_share.append(train_counts.max() / train_counts.sum())
        argmax_match.append(train_counts.argmax() == test_counts.argmax())
        # Same p per class: test share of each class is about half the train share (500 vs 1000).
        np.testing.assert_allclose(test_counts, train_counts / 2, atol=3)
    # With 10 classes an IID client's dominant share would be about 0.1.
    assert np.median(dominant_share) > 0.5
    assert np.mean(argmax_match) >= 0.9


def test_dirichlet_split_large_alpha_is_nearly_iid():
    train, test = _labels(1000, 10, 0), _labels(100, 10, 1)
    train_parts, _ = data.dirichlet_split(
        train, test, num_clients=5, alpha=1000.0, min_train_examples=1, seed=0
    )
    for tr in train_parts:
        counts = np.bincount(train[tr], minlength=10)
        np.testing.assert_allclose(counts / counts.sum(), 0.1, atol=0.03)


def test_dirichlet_split_impossible_request_raises():
    train, test = _labels(10, 10, 0), _labels(5, 10, 1)
    with pytest.raises(ValueError, match='too many clients|exceeds'):
        data.dirichlet_split(train, test, num_clients=20, alpha=0.5, min_train_examples=10, seed=0)
    # Feasible in total, but a tiny alpha almost never gives 50 clients 2 examples each.
    with pytest.raises(ValueError, match='too small alpha'):
        data.dirichlet_split(
            train, test, num_clients=50, alpha=0.01, min_train_examples=2, seed=0, max_attempts=20
        )


# ---------------------------------------------------------------------------------------------
# IDX files


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack('>BBBB', 0, 0, 0x08, array.ndim)
    header += struct.pack(f'>{array.ndim}I', *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion_idx(directory, n_train: int, n_test: int, compress: bool):
    rng = np.random.default_rng(0)
    arrays = {
        'train-images-idx3-ubyte': rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        'train-labels-idx1-ubyte': rng.integers(0, 10, n_train, dtype=np.uint8),
        't10k-images-idx3-ubyte': rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        't10k-labels-idx1-ubyte': rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        raw = _idx_bytes(array)
        path = os.path.join(directory, name + ('.gz' if compress else ''))
        with open(path, 'wb') as f:
            f.write(gzip.compress(raw) if compress else raw)
    return arrays


def test_read_idx_plain_gzip_and_misnamed(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / 'plain').write_bytes(_idx_bytes(array))
    # gzip detected from the magic bytes, not the name.
    (tmp_path / 'compressed_without_suffix').write_bytes(gzip.compress(_idx_bytes(array)))
    for name in ('plain', 'compressed_without_suffix'):
        out = data.read_idx(tmp_path / name)
        assert out.shape == (2, 3, 4) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, array)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    (tmp_path / 'labels').write_bytes(_idx_bytes(labels))
    np.testing.assert_array_equal(data.read_idx(tmp_path / 'labels'), [3, 1, 4, 1, 5])
    (tmp_path / 'truncated').write_bytes(_idx_bytes(array)[:-1])
    with pytest.raises(ValueError, match='header says'):
        data.read_idx(tmp_path / 'truncated')


@pytest.mark.parametrize('compress', [True, False])
def test_load_fashion_mnist_idx(tmp_path, compress):
    arrays = _write_fashion_idx(tmp_path, n_train=12, n_test=5, compress=compress)
    ds = data.load_fashion_mnist_idx(tmp_path)
    assert ds.name == 'fashion_mnist' and ds.num_classes == 10 and ds.pixel_max == 255.0
    assert ds.train_images.shape == (12, 28, 28, 1) and ds.test_images.shape == (5, 28, 28, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.image_shape == (28, 28, 1)
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays['train-images-idx3-ubyte'])
    np.testing.assert_array_equal(ds.test_images[..., 0], arrays['t10k-images-idx3-ubyte'])
    np.testing.assert_array_equal(ds.train_labels, arrays['train-labels-idx1-ubyte'])
    np.testing.assert_array_equal(ds.test_labels, arrays['t10k-labels-idx1-ubyte'])
    scaled = arrays['train-images-idx3-ubyte'] / 255.0
    np.testing.assert_allclose(ds.mean, [scaled.mean()], rtol=1e-12)
    np.testing.assert_allclose(ds.std, [scaled.std()], rtol=1e-12)


def test_load_dataset_finds_idx_files_in_data_dir_subdirectory(tmp_path):
    (tmp_path / 'fashion_mnist').mkdir()
    arrays = _write_fashion_idx(tmp_path / 'fashion_mnist', n_train=3, n_test=2, compress=True)
    ds = data.load_dataset('fashion_mnist', data_dir=str(tmp_path))
    np.testing.assert_array_equal(ds.test_labels, arrays['t10k-labels-idx1-ubyte'])


# ---------------------------------------------------------------------------------------------
# digits


def test_load_digits():
    ds = data.load_digits()
    assert ds.name == 'digits' and ds.num_classes == 10 and ds.pixel_max == 16.0
    assert len(ds.train_labels) + len(ds.test_labels) == 1797
    assert len(ds.test_labels) == 450  # ceil(0.25 * 1797)
    assert ds.train_images.shape == (1347, 8, 8, 1) and ds.image_shape == (8, 8, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.train_images.max() == 16 and ds.train_images.min() == 0
    np.testing.assert_array_equal(np.unique(ds.test_labels), np.arange(10))
    # Stratified: every class has about a quarter of its examples in the test set.
    test_counts, train_counts = np.bincount(ds.test_labels), np.bincount(ds.train_labels)
    test_share = test_counts / (test_counts + train_counts)
    np.testing.assert_allclose(test_share, 0.25, atol=0.01)
    np.testing.assert_allclose(ds.mean, [(ds.train_images / 16.0).mean()], rtol=1e-12)
    again = data.load_digits()
    np.testing.assert_array_equal(again.test_images, ds.test_images)


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets (no TensorFlow installed)


def test_tensorflow_is_not_needed():
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel


def _png(image: np.ndarray) -> bytes:
    from PIL import Image  # pylint: disable=import-outside-toplevel

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='PNG')
    return buf.getvalue()


def test_load_tfds_reads_real_array_record_files(tmp_path, monkeypatch):
    """Prepares cifar10 with tfds's own builder (array_record) from fake source data, reads it back.

    Only the source of the examples is replaced: the files on disk are laid out exactly as
    `tfds build cifar10 --file_format=array_record` would write them. Images are given as PNG bytes
    because tfds's own PNG encoder needs TensorFlow.
    """
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    splits = {
        'train': (rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 30)),
        'test': (rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 7)),
    }
    cifar10_cls = tfds.builder_cls('cifar10')

    def split_generators(self, dl_manager):
        del dl_manager  # Never download.
        return {split: self._generate_examples(split) for split in splits}

    def generate_examples(self, split):
        del self
        images, labels = splits[split]
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {'id': f'{split}_{i}', 'image': _png(image), 'label': int(label)}

    monkeypatch.setattr(cifar10_cls, '_split_generators', split_generators)
    monkeypatch.setattr(cifar10_cls, '_generate_examples', generate_examples)
    builder = tfds.builder('cifar10', data_dir=str(tmp_path), file_format='array_record')
    builder.download_and_prepare()
    assert list((tmp_path / 'cifar10' / '3.0.2').glob('cifar10-train.array_record-*'))
    monkeypatch.undo()

    ds = data.load_tfds('cifar10', str(tmp_path))
    assert ds.train_images.shape == (30, 32, 32, 3) and ds.test_images.shape == (7, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.num_classes == 10 and ds.image_shape == (32, 32, 3)
    # tfds shuffles the record order, so compare as sets of (image, label).
    for split, images, labels in (
        ('train', ds.train_images, ds.train_labels),
        ('test', ds.test_images, ds.test_labels),
    ):
        want = sorted((im.tobytes(), int(lb)) for im, lb in zip(*splits[split]))
        got = sorted((im.tobytes(), int(lb)) for im, lb in zip(images, labels))
        assert got == want, split


@pytest.mark.parametrize(
    'name, shape, num_classes',
    [
        ('fashion_mnist', (28, 28, 1), 10),
        ('cifar10', (32, 32, 3), 10),
        ('cifar100', (32, 32, 3), 100),
    ],
)
def test_load_tfds_under_mock_data(tmp_path, name, shape, num_classes):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    # Our loader checks the version directory before touching tfds; mock_data replaces the rest.
    version = str(tfds.builder_cls(name).VERSION)
    (tmp_path / name / version).mkdir(parents=True)
    (tmp_path / name / version / 'dataset_info.json').write_text('{}')
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_tfds(name, str(tmp_path))
    assert ds.train_images.shape == (6, *shape) and ds.test_images.shape == (6, *shape)
    assert ds.train_images.dtype == np.uint8 and ds.test_labels.dtype == np.int32
    assert ds.num_classes == num_classes
    for labels in (ds.train_labels, ds.test_labels):
        assert labels.min() >= 0 and labels.max() < num_classes
    assert len(ds.mean) == len(ds.std) == shape[-1]


def test_missing_dataset_raises_quickly_with_directory_and_command(tmp_path):
    start = time.monotonic()
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset('cifar10', data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert '\n' not in message
    assert 'cifar10' in message and str(tmp_path) in message
    assert 'tfds build cifar10' in message and '--file_format=array_record' in message


def test_missing_fashion_mnist_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'FASHION_MNIST_DIRS', (str(tmp_path / 'apt'),))
    start = time.monotonic()
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset('fashion_mnist', data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert '\n' not in message
    for place in (tmp_path, tmp_path / 'fashion_mnist', tmp_path / 'apt'):
        assert f'IDX files in {place};' in message
    assert 'apt-get install dataset-fashion-mnist' in message
    assert 'tfds build fashion_mnist' in message


def test_tfds_data_in_tfrecord_format_is_reported(tmp_path):
    """Data built with tfds's default (TFRecord) format cannot be read without TensorFlow."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    version_dir = tmp_path / 'cifar10' / str(tfds.builder_cls('cifar10').VERSION)
    version_dir.mkdir(parents=True)
    info = tfds.builder('cifar10', data_dir=str(tmp_path / 'elsewhere')).info
    info.write_to_directory(str(version_dir))  # fileFormat defaults to tfrecord.
    with pytest.raises(data.DatasetUnavailableError, match='array_record'):
        data.load_tfds('cifar10', str(tmp_path))


def test_unknown_dataset_raises_value_error():
    with pytest.raises(ValueError, match='digits, fashion_mnist, cifar10, cifar100'):
        data.load_dataset('mnist')


@pytest.mark.skipif(
    not os.path.isdir(data.FASHION_MNIST_DIRS[0]),
    reason=f'{data.FASHION_MNIST_DIRS[0]} absent (apt-get install dataset-fashion-mnist)',
)
def test_load_real_fashion_mnist():
    ds = data.load_dataset('fashion_mnist')
    assert ds.train_images.shape == (60000, 28, 28, 1)
    assert ds.test_images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ds.train_labels), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(ds.test_labels), np.full(10, 1000))
    # Published Fashion-MNIST statistics.
    np.testing.assert_allclose(ds.mean, [0.2860], atol=1e-4)
    np.testing.assert_allclose(ds.std, [0.3530], atol=1e-4)


@pytest.mark.parametrize('damage', ['garbage', 'truncated_gzip', 'wrong_magic', 'counts', 'labels'])
def test_a_damaged_fashion_mnist_file_is_one_line_naming_it(tmp_path, damage):
    _write_fashion_idx(tmp_path, n_train=12, n_test=5, compress=True)
    train_images = tmp_path / 'train-images-idx3-ubyte.gz'
    train_labels = tmp_path / 'train-labels-idx1-ubyte.gz'
    if damage == 'garbage':
        train_images.write_bytes(b'this is not an IDX file at all')
    elif damage == 'truncated_gzip':
        train_images.write_bytes(train_images.read_bytes()[:40])
    elif damage == 'wrong_magic':
        train_images.write_bytes(
            gzip.compress(b'\x01\x02' + gzip.decompress(train_images.read_bytes())[2:])
        )
    elif damage == 'counts':
        train_labels.write_bytes(gzip.compress(_idx_bytes(np.zeros(11, np.uint8))))
    else:
        train_labels.write_bytes(gzip.compress(_idx_bytes(np.full(12, 42, np.uint8))))
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_fashion_mnist_idx(tmp_path)
    message = str(info.value)
    assert '\n' not in message and 'replace' in message
    named = train_labels.name if damage in ('counts', 'labels') else train_images.name
    assert named in message or 'train files' in message, message
