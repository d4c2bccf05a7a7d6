"""Test-session set-up: one persistent JAX compilation cache shared by every test and subprocess.

Many tests compile the same functions again (several runs of one config, resumed runs, the command
line in subprocesses). A cache in a fresh directory per session lets them reuse the executables
without carrying anything over from an earlier session. Subprocesses inherit it through the
environment.
"""

import atexit
import os
import shutil
import tempfile

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix='spafl_jax_test_cache_')
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
