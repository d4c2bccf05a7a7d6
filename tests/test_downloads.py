"""Datasets that arrive by themselves, tested against a local HTTP server on 127.0.0.1.

The server serves small archives laid out byte for byte like the published ones (gzip-compressed
IDX files for Fashion-MNIST; tar.gz of fixed-size binary records for CIFAR-10 and CIFAR-100); the
tests point `downloads.SOURCES` at them with their own sizes and digests. Nothing here reaches the
network.
"""

import gzip
import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest

from spafl_jax import data
from spafl_jax import downloads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Archives in the real formats.


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _fashion_mnist_files(rng):
    arrays = {
        'train_images': rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        'train_labels': rng.integers(0, 10, 30).astype(np.uint8),
        'test_images': rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        'test_labels': rng.integers(0, 10, 12).astype(np.uint8),
    }
    names = {
        'train_images': 'train-images-idx3-ubyte.gz',
        'train_labels': 'train-labels-idx1-ubyte.gz',
        'test_images': 't10k-images-idx3-ubyte.gz',
        'test_labels': 't10k-labels-idx1-ubyte.gz',
    }
    return arrays, {names[k]: _idx(v) for k, v in arrays.items()}


def _records(images: np.ndarray, labels: list[np.ndarray]) -> bytes:
    """CIFAR binary records: label byte(s), then the image's 3x32x32 pixels channel by channel."""
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    columns = [np.asarray(l, np.uint8)[:, None] for l in labels] + [chw]
    return np.concatenate(columns, axis=1).tobytes()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode='w:gz') as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def _cifar10_archive(rng):
    batches = [rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for _ in range(6)]
    labels = [rng.integers(0, 10, 4) for _ in range(6)]
    members = {
        f'cifar-10-batches-bin/data_batch_{i + 1}.bin': _records(batches[i], [labels[i]])
        for i in range(5)
    }
    members['cifar-10-batches-bin/test_batch.bin'] = _records(batches[5], [labels[5]])
    members['cifar-10-batches-bin/batches.meta.txt'] = b'airplane\nautomobile\n'
    train = (np.concatenate(batches[:5]), np.concatenate(labels[:5]))
    return train, (batches[5], labels[5]), _tar_gz(members)


def _cifar100_archive(rng):
    images = [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (7, 3)]
    fine = [rng.integers(0, 100, n) for n in (7, 3)]
    coarse = [f // 5 for f in fine]
    members = {
        'cifar-100-binary/coarse_label_names.txt': b'aquatic_mammals\n',
        'cifar-100-binary/train.bin': _records(images[0], [coarse[0], fine[0]]),
        'cifar-100-binary/test.bin': _records(images[1], [coarse[1], fine[1]]),
        'cifar-100-binary/fine_label_names.txt': b'apple\n',
    }
    return (images[0], fine[0]), (images[1], fine[1]), _tar_gz(members)


# ------------------------------------------------------------------------------------------------
# The server: files by name; a few names misbehave on purpose.


class _Server:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.truncated: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the stdlib's name)
                name = self.path.lstrip('/')
                server.requests.append(name)
                if name not in server.files:
                    self.send_error(404)
                    return
                payload = server.files[name]
                self.send_response(200)
                self.send_header('Content-Length', str(len(payload)))
                self.end_headers()
                if name in server.truncated:  # the connection drops half-way
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/'
        # A short poll: `shutdown` waits for the serving loop's next poll (0.5 s by default).
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={'poll_interval': 0.01}, daemon=True
        )
        self.thread.start()

    def publish(self, name: str, payload: bytes, served: bytes | None = None) -> downloads.Archive:
        """Serves `served` (default `payload`) under `name`; the Archive the tests expect."""
        self.files[name] = payload if served is None else served
        return downloads.Archive(self.url + name, len(payload), hashlib.sha256(payload).hexdigest())

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def fashion_mnist_server(server, monkeypatch):
    arrays, files = _fashion_mnist_files(np.random.default_rng(0))
    monkeypatch.setitem(
        downloads.SOURCES,
        'fashion_mnist',
        tuple(server.publish(name, payload) for name, payload in files.items()),
    )
    monkeypatch.setattr(data, 'FASHION_MNIST_DIRS', ())  # never the Debian files
    return server, arrays


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return f'http://127.0.0.1:{port}/'  # nothing listens there: connection refused


def _files(directory) -> list[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


# ------------------------------------------------------------------------------------------------


def test_fashion_mnist_downloads_checked_and_then_loads_without_the_network(
    fashion_mnist_server, tmp_path, capsys
):
    server, arrays = fashion_mnist_server
    ds = data.load_dataset('fashion_mnist', str(tmp_path), download=True)
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays['train_images'])
    np.testing.assert_array_equal(ds.train_labels, arrays['train_labels'])
    np.testing.assert_array_equal(ds.test_images[..., 0], arrays['test_images'])
    np.testing.assert_array_equal(ds.test_labels, arrays['test_labels'])
    assert _files(tmp_path / 'fashion_mnist') == sorted(
        a.filename for a in downloads.SOURCES['fashion_mnist']
    )
    assert len(server.requests) == 4
    assert 'downloading train-images-idx3-ubyte.gz: 100% 0.0/0.0 MB' in capsys.readouterr().err

    server.close()  # the second load reads the files already there
    again = data.load_dataset('fashion_mnist', str(tmp_path), download=True)
    np.testing.assert_array_equal(again.train_images, ds.train_images)


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_cifar_binary_archive_downloads_and_parses_exactly(server, monkeypatch, tmp_path, name):
    make = _cifar10_archive if name == 'cifar10' else _cifar100_archive
    (train_images, train_labels), (test_images, test_labels), archive = make(
        np.random.default_rng(1)
    )
    filename = downloads.SOURCES[name][0].filename
    monkeypatch.setitem(downloads.SOURCES, name, (server.publish(filename, archive),))
    ds = data.load_dataset(name, str(tmp_path), download=True)
    assert ds.image_shape == (32, 32, 3) and ds.num_classes == (10 if name == 'cifar10' else 100)
    np.testing.assert_array_equal(ds.train_images, train_images)  # CHW records -> HWC pixels
    np.testing.assert_array_equal(ds.train_labels, train_labels)  # CIFAR-100: the fine label
    np.testing.assert_array_equal(ds.test_images, test_images)
    np.testing.assert_array_equal(ds.test_labels, test_labels)
    assert _files(tmp_path / name) == [filename]

    # Without a data_dir the archive goes to $SPAFL_DATA_DIR (default ~/.cache/spafl_jax).
    monkeypatch.setenv('SPAFL_DATA_DIR', str(tmp_path / 'cache'))
    data.load_dataset(name, download=True)
    assert _files(tmp_path / 'cache' / name) == [filename]


def test_a_corrupt_download_is_detected_and_not_left_behind(server, monkeypatch, tmp_path):
    _, _, archive = _cifar10_archive(np.random.default_rng(2))
    corrupt = bytearray(archive)
    corrupt[len(corrupt) // 2] ^= 0xFF  # same size, one byte wrong
    monkeypatch.setitem(
        downloads.SOURCES,
        'cifar10',
        (server.publish('cifar-10-binary.tar.gz', archive, served=bytes(corrupt)),),
    )
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset('cifar10', str(tmp_path), download=True)
    message = str(info.value)
    assert 'the download is corrupt' in message and 'SHA-256' in message and '\n' not in message
    assert _files(tmp_path / 'cifar10') == []  # neither the file nor a .part


def test_a_dropped_connection_is_detected_and_not_left_behind(server, monkeypatch, tmp_path):
    _, _, archive = _cifar100_archive(np.random.default_rng(3))
    monkeypatch.setitem(
        downloads.SOURCES, 'cifar100', (server.publish('cifar-100-binary.tar.gz', archive),)
    )
    server.truncated.add('cifar-100-binary.tar.gz')
    with pytest.raises(data.DatasetUnavailableError, match='cannot download|ended after'):
        data.load_dataset('cifar100', str(tmp_path), download=True)
    assert _files(tmp_path / 'cifar100') == []


def test_a_wrong_file_already_in_place_is_named_and_kept(server, monkeypatch, tmp_path):
    _, _, archive = _cifar10_archive(np.random.default_rng(4))
    monkeypatch.setitem(
        downloads.SOURCES, 'cifar10', (server.publish('cifar-10-binary.tar.gz', archive),)
    )
    (tmp_path / 'cifar10').mkdir()
    (tmp_path / 'cifar10' / 'cifar-10-binary.tar.gz').write_bytes(b'my own file')
    with pytest.raises(
        data.DatasetUnavailableError,
        match='is not the published cifar-10-binary.tar.gz .11 bytes where',
    ):
        data.load_dataset('cifar10', str(tmp_path), download=True)
    assert (tmp_path / 'cifar10' / 'cifar-10-binary.tar.gz').read_bytes() == b'my own file'
    assert server.requests == []


def test_offline_fails_within_seconds_naming_the_places_and_the_fix(fashion_mnist_server, tmp_path):
    offline = _closed_port_url()
    start = time.monotonic()
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset('fashion_mnist', str(tmp_path), download=True, mirror=offline)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert '\n' not in message
    assert message.startswith(
        f'fashion_mnist is not on this machine (looked for IDX files in {tmp_path};'
    )
    assert f'cannot download {offline}train-images-idx3-ubyte.gz (ConnectionRefusedError' in message
    assert (
        'To provide it offline, install it with `sudo apt-get install dataset-fashion-mnist`'
        in message
    )
    assert f'download {offline}train-images-idx3-ubyte.gz, ' in message
    assert f'into {tmp_path / "fashion_mnist"}' in message
    assert _files(tmp_path / 'fashion_mnist') == []


def test_without_download_nothing_is_fetched(fashion_mnist_server, tmp_path):
    server, _ = fashion_mnist_server
    with pytest.raises(data.DatasetUnavailableError, match='is not available .looked for IDX'):
        data.load_dataset('fashion_mnist', str(tmp_path))
    assert server.requests == []


def test_a_redirect_is_followed(server, monkeypatch, tmp_path):
    """Published URLs move; the download follows the server's redirect to the file."""
    _, _, archive = _cifar10_archive(np.random.default_rng(5))
    expected = server.publish('moved/cifar-10-binary.tar.gz', archive)
    original = server.httpd.RequestHandlerClass.do_GET

    def do_get(handler):
        if handler.path == '/cifar-10-binary.tar.gz':
            handler.send_response(302)
            handler.send_header('Location', '/moved/cifar-10-binary.tar.gz')
            handler.send_header('Content-Length', '0')
            handler.end_headers()
            return
        original(handler)

    monkeypatch.setattr(server.httpd.RequestHandlerClass, 'do_GET', do_get)
    monkeypatch.setitem(
        downloads.SOURCES,
        'cifar10',
        (downloads.Archive(server.url + 'cifar-10-binary.tar.gz', expected.size, expected.sha256),),
    )
    assert data.load_dataset('cifar10', str(tmp_path), download=True).train_images.shape == (
        20,
        32,
        32,
        3,
    )


@pytest.mark.slow
def test_the_runner_downloads_fashion_mnist_and_trains(fashion_mnist_server, tmp_path):
    """End to end: config.download fetches the archives from the server, a round trains on them."""
    sys.path.insert(0, REPO)
    from spafl_jax.configs import fmnist  # pylint: disable=import-outside-toplevel
    from spafl_jax import train  # pylint: disable=import-outside-toplevel

    server, _ = fashion_mnist_server
    config = fmnist.get_config()
    config.update(
        data_dir=str(tmp_path / 'data'),
        num_clients=3,
        clients_per_round=2,
        rounds=1,
        local_epochs=1,
        batch_size=4,
        alpha=100.0,
    )
    summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert summary['rounds'] == 1 and 0.0 <= summary['accuracy'] <= 1.0
    assert len(server.requests) == 4
    assert _files(tmp_path / 'data' / 'fashion_mnist') == sorted(
        a.filename for a in downloads.SOURCES['fashion_mnist']
    )


@pytest.mark.slow
def test_the_runner_offline_fails_within_seconds(tmp_path):
    """experiments/main.py with the published sources unreachable: one line, no traceback."""
    env = dict(os.environ, SPAFL_DATA_MIRROR=_closed_port_url())
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, 'experiments', 'main.py'),
            '--config=cifar10.py',
            f'--config.data_dir={tmp_path}',
            f'--workdir={tmp_path}/w',
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stderr
    error = [l for l in proc.stderr.splitlines() if 'cifar10 is not on this machine' in l]
    assert len(error) == 1 and 'ConnectionRefusedError' in error[0], proc.stderr[-2000:]
    assert f'into {tmp_path}/cifar10' in error[0]
