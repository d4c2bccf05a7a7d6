"""Test-session set-up of the research tests, as tests/conftest.py sets up the product tests.

    python -m pytest -q research/tests          # from the repository root; .ci/run runs it

One persistent JAX compilation cache in a fresh directory per session, shared by every test and
the subprocesses they start (through the environment), and, for `-m "not slow"`, compilation
without LLVM's optimizations (the same programs, compiled about 5x faster). The research tests
import the repository's code by path (research/, tests/reference/ and the root on sys.path), so
nothing here needs an install beyond requirements.txt.
"""

import atexit
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

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
