"""Test-session set-up: one persistent JAX compilation cache shared by every test and subprocess,
and quick compilation for the fast suite.

Many tests compile the same functions again (several runs of one config, resumed runs, the command
line in subprocesses). A cache in a fresh directory per session lets them reuse the executables
without carrying anything over from an earlier session. Subprocesses inherit it through the
environment.

The fast suite (`pytest -m "not slow"`) spends most of its time compiling small programs, so it
compiles them without LLVM's optimizations (`--xla_backend_optimization_level=0`, about 5x faster
to compile): XLA builds the same programs, with the same fusions, and only their machine code is
less optimized, which no test measures. The full suite, which CI runs, compiles as users do.
"""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/faults.py

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix='spafl_jax_test_cache_')
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'


FAST_COMPILE_FLAG = '--xla_backend_optimization_level=0'


def pytest_configure(config):
    # Before any test module touches a device (the flags are read when the backend starts).
    flags = os.environ.get('XLA_FLAGS', '')
    if config.option.markexpr.strip() == 'not slow' and 'optimization_level' not in flags:
        os.environ['XLA_FLAGS'] = f'{flags} {FAST_COMPILE_FLAG}'.strip()


@pytest.fixture(scope='session')
def reference(tmp_path_factory):
    """An uninterrupted run of `faults.FLAGS` (the digits default, 8 rounds) that resumed, killed
    and damaged runs must end equal to."""
    import faults  # pylint: disable=import-outside-toplevel

    workdir = str(tmp_path_factory.mktemp('reference'))
    faults.finish(workdir)
    return workdir
