"""The canonical dataset archives, downloaded once, checked, and never left half-written.

Fashion-MNIST comes as its four gzip-compressed IDX files, CIFAR-10 and CIFAR-100 as their binary
archives (`cifar-10-binary.tar.gz`, `cifar-100-binary.tar.gz`: fixed-size records, no pickle), all
from the places the datasets' authors publish them and with the sizes and SHA-256 digests that
tensorflow-datasets records for the same files. Neither TensorFlow nor tensorflow-datasets is
needed: `spafl_jax.data` parses the files with numpy.

A download goes to `<file>.part` next to its target while the digest is computed on the fly; only a
file of the right size and digest is renamed to its final name, and anything else is deleted, so a
directory holds whole, verified archives or nothing. Connecting and each read wait at most
`CONNECT_TIMEOUT` / `READ_TIMEOUT` seconds and nothing is retried: offline, a download fails in
seconds with a message that says how to provide the files instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import sys
import time
import urllib.parse
from collections.abc import Callable

CONNECT_TIMEOUT = 4.0  # seconds to connect and receive the response headers
READ_TIMEOUT = 60.0  # seconds any one read of the body may wait
_CHUNK = 1 << 20
_MAX_REDIRECTS = 5

# A mirror holding the same files under one base URL (e.g. an institute's cache, or a test server),
# used instead of the authors' URLs when set; the sizes and digests are checked all the same.
MIRROR_ENV = 'SPAFL_DATA_MIRROR'


class DownloadError(RuntimeError):
    """A download failed or delivered the wrong bytes; the message says what to do instead."""


@dataclasses.dataclass(frozen=True)
class Archive:
    """One published file: where it is, how many bytes, and their SHA-256."""

    url: str
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return os.path.basename(urllib.parse.urlparse(self.url).path)


_FMNIST = 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'
_KRIZ = 'https://www.cs.toronto.edu/~kriz/'

SOURCES: dict[str, tuple[Archive, ...]] = {
    'fashion_mnist': (
        Archive(
            _FMNIST + 'train-images-idx3-ubyte.gz',
            26421880,
            '3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84',
        ),
        Archive(
            _FMNIST + 'train-labels-idx1-ubyte.gz',
            29515,
            'a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845',
        ),
        Archive(
            _FMNIST + 't10k-images-idx3-ubyte.gz',
            4422102,
            '346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073',
        ),
        Archive(
            _FMNIST + 't10k-labels-idx1-ubyte.gz',
            5148,
            '67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5',
        ),
    ),
    'cifar10': (
        Archive(
            _KRIZ + 'cifar-10-binary.tar.gz',
            170052171,
            'c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd',
        ),
    ),
    'cifar100': (
        Archive(
            _KRIZ + 'cifar-100-binary.tar.gz',
            168513733,
            '58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec',
        ),
    ),
}


def default_root() -> str:
    """Where downloads go when no data_dir is given: $SPAFL_DATA_DIR, else ~/.cache/spafl_jax."""
    return os.path.expanduser(os.environ.get('SPAFL_DATA_DIR', '~/.cache/spafl_jax'))


def url_of(archive: Archive, mirror: str | None = None) -> str:
    """The archive's URL, or its file name under `mirror` (default: $SPAFL_DATA_MIRROR, if set)."""
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV, '')
    return mirror.rstrip('/') + '/' + archive.filename if mirror else archive.url


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(_CHUNK), b''):
            digest.update(chunk)
    return digest.hexdigest()


def verify(archive: Archive, path: str) -> str | None:
    """None if `path` holds exactly the archive, else what is wrong with it."""
    size = os.path.getsize(path)
    if size != archive.size:
        return f'{size} bytes where {archive.size} were expected'
    digest = sha256_of(path)
    if digest != archive.sha256:
        return f'SHA-256 {digest} where {archive.sha256} was expected'
    return None


class _Progress:
    """One line on stderr, redrawn in place on a terminal, every 10 % otherwise (logs)."""

    def __init__(self, name: str, total: int, stream=None):
        self.name, self.total, self.stream = name, total, stream or sys.stderr
        self.start = time.monotonic()
        self.shown = -1
        self.tty = getattr(self.stream, 'isatty', lambda: False)()

    def update(self, done: int, final: bool = False) -> None:
        tenth = 10 * done // max(self.total, 1)
        if not (final or self.tty or tenth > self.shown):
            return
        self.shown = tenth
        seconds = max(time.monotonic() - self.start, 1e-9)
        line = (
            f'downloading {self.name}: {100 * done / max(self.total, 1):3.0f}% '
            f'{done / 1e6:.1f}/{self.total / 1e6:.1f} MB, {done / 1e6 / seconds:.1f} MB/s'
        )
        end = '\n' if final or not self.tty else ''
        self.stream.write(('\r' if self.tty else '') + line + end)
        self.stream.flush()


def _open(url: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """GET `url` (following redirects) with the connect timeout; the body reads wait longer."""
    for _ in range(_MAX_REDIRECTS + 1):
        parts = urllib.parse.urlparse(url)
        if parts.scheme not in ('http', 'https'):
            raise DownloadError(f'cannot download {url}: only http and https URLs are supported.')
        kind = (
            http.client.HTTPSConnection if parts.scheme == 'https' else http.client.HTTPConnection
        )
        connection = kind(parts.netloc, timeout=CONNECT_TIMEOUT)
        path = parts.path + (f'?{parts.query}' if parts.query else '')
        connection.request('GET', path or '/', headers={'User-Agent': 'spafl_jax'})
        response = connection.getresponse()
        if response.status in (301, 302, 303, 307, 308) and response.getheader('Location'):
            url = urllib.parse.urljoin(url, response.getheader('Location'))
            connection.close()
            continue
        if response.status != 200:
            connection.close()
            raise DownloadError(f'{url} answered HTTP {response.status} {response.reason}.')
        if connection.sock is not None:
            connection.sock.settimeout(READ_TIMEOUT)
        return connection, response
    raise DownloadError(f'{url}: more than {_MAX_REDIRECTS} redirects.')


def fetch(
    archive: Archive,
    directory: str,
    *,
    mirror: str | None = None,
    progress: Callable[[str, int], _Progress] | None = _Progress,
) -> str:
    """The path of `archive` in `directory`, downloading it if it is not there yet.

    Raises:
      DownloadError: the server could not be reached or answered wrongly, or the bytes are not the
        archive's (the partial file is deleted); a file already in place with the wrong bytes is
        named and left alone.
    """
    path = os.path.join(directory, archive.filename)
    if os.path.exists(path):
        problem = verify(archive, path)
        if problem:
            raise DownloadError(
                f'{path} is not the published {archive.filename} ({problem}); '
                'delete it (or replace it with the right file) and run again.'
            )
        return path
    os.makedirs(directory, exist_ok=True)
    url = url_of(archive, mirror)
    partial = path + '.part'
    digest, done = hashlib.sha256(), 0
    try:
        connection, response = _open(url)
        try:
            bar = progress(archive.filename, archive.size) if progress else None
            with open(partial, 'wb') as f:
                while chunk := response.read(_CHUNK):
                    if done + len(chunk) > archive.size:
                        raise DownloadError(
                            f'{url} sent more than the {archive.size} bytes of '
                            f'{archive.filename}; the file there is not the '
                            'published one.'
                        )
                    f.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if bar:
                        bar.update(done)
                f.flush()
                os.fsync(f.fileno())
            if bar:
                bar.update(done, final=True)
        finally:
            connection.close()
        if done != archive.size:
            raise DownloadError(
                f'{url} ended after {done} of {archive.size} bytes; run again to '
                'restart the download.'
            )
        if digest.hexdigest() != archive.sha256:
            raise DownloadError(
                f'{url} delivered {archive.filename} with SHA-256 '
                f'{digest.hexdigest()}, not the published {archive.sha256}: the '
                'download is corrupt (or the mirror serves another file) and was '
                'deleted.'
            )
        os.replace(partial, path)
    except (OSError, http.client.HTTPException) as e:
        # Connection refused, name resolution, timeouts, a dropped connection: no retry.
        raise DownloadError(f'cannot download {url} ({type(e).__name__}: {e}).') from e
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def download(
    name: str,
    directory: str,
    *,
    mirror: str | None = None,
    progress: Callable[[str, int], _Progress] | None = _Progress,
) -> list[str]:
    """Every archive of dataset `name` in `directory` (downloaded where missing), in SOURCES order."""
    if name not in SOURCES:
        raise ValueError(f'download: no archives for {name!r}; available: {", ".join(SOURCES)}.')
    return [
        fetch(archive, directory, mirror=mirror, progress=progress) for archive in SOURCES[name]
    ]
