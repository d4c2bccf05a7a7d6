"""Test-session set-up: one persistent JAX compilation cache shared by every test and subprocess.

Many tests compile the same functions again (several runs of one config, resumed runs, the command
line in subprocesses). A cache in a fresh directory per session lets them reuse the executables
without carrying anything over from an earlier session. Subprocesses inherit it through the
environment.
"""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # tests/faults.py

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix='spafl_jax_test_cache_')
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'


@pytest.fixture(scope='session')
def reference(tmp_path_factory):
    """An uninterrupted run of `faults.FLAGS` (the digits default, 8 rounds) that resumed, killed
    and damaged runs must end equal to."""
    import faults  # pylint: disable=import-outside-toplevel
    workdir = str(tmp_path_factory.mktemp('reference'))
    faults.finish(workdir)
    return workdir
