"""Fault injection: every way a user or a hostile machine can break a run, tried as a real process.

Three classes, each run as `experiments/main.py` in a subprocess on the digits default:

* `INPUT_CASES`: what a user can type or point at (config file, fields, values, data files, the
  workdir). Each must stop before any compilation with exit status 2 and exactly one `error:` line
  naming the field or file, and must leave every file already in the workdir as it was.
* `DIVERGENCE_CASES` and `SIGNAL_CASES`: a run that diverges stops with status 3 naming the round;
  SIGTERM/SIGINT stop at the round boundary with 143/130; a second Ctrl-C stops at once.
* `kill_at_random` and `DAMAGES`: SIGKILL at moments drawn from a seeded generator, and files
  damaged as a crash, a full disk or a careless hand would leave them; the resumed run must end byte
  for byte as an uninterrupted one.

`tests/test_faults.py` asserts all of it. Run this file to print every case with its exit status
and its one line of output (the table of the reliability issue's closing note):

    python tests/faults.py
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, 'experiments', 'main.py')

ROUNDS = 8
# A small federated run of the digits default: a few seconds a run, several checkpoints.
FLAGS = (
    '--config.num_clients=6',
    '--config.clients_per_round=3',
    f'--config.rounds={ROUNDS}',
    '--config.local_epochs=1',
    '--config.checkpoint_every=2',
    '--config.sparsity_rounds=(1,)',
)


def command(workdir: str, *extra: str, flags=FLAGS) -> list[str]:
    """The run of `flags` in `workdir`; `extra` flags come last, so that they win."""
    return [sys.executable, MAIN, f'--workdir={workdir}', *flags, *extra]


def env() -> dict[str, str]:
    return {**os.environ, 'JAX_PLATFORMS': 'cpu'}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(('error:', 'interrupted'))]


def one_line(stderr: str) -> str:
    """The line a user reads: the `error:` line, else the last line."""
    lines = error_lines(stderr) or [l for l in stderr.splitlines() if l.strip()] or ['']
    return lines[-1]


def tree_digest(directory: str) -> dict[str, str]:
    """SHA-256 of every file under `directory` (relative paths), the lock file aside."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel == '.lock':
                continue
            with open(path, 'rb') as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------
# Input errors: status 2, one line, nothing compiled, nothing written.


def _idx(array: np.ndarray) -> bytes:
    return (
        struct.pack('>BBBB', 0, 0, 0x08, array.ndim)
        + struct.pack(f'>{array.ndim}I', *array.shape)
        + array.astype(np.uint8).tobytes()
    )


def _fashion_files(directory: str, damage: str) -> None:
    """Small Fashion-MNIST IDX files in the real format, one of them damaged by `damage`."""
    rng = np.random.default_rng(0)
    arrays = {
        'train-images-idx3-ubyte': rng.integers(0, 256, (40, 28, 28)),
        'train-labels-idx1-ubyte': rng.integers(0, 10, 40),
        't10k-images-idx3-ubyte': rng.integers(0, 256, (20, 28, 28)),
        't10k-labels-idx1-ubyte': rng.integers(0, 10, 20),
    }
    blobs = {name: gzip.compress(_idx(a)) for name, a in arrays.items()}
    images, labels = 'train-images-idx3-ubyte', 'train-labels-idx1-ubyte'
    if damage == 'garbage':
        blobs[images] = b'this is not an IDX file at all'
    elif damage == 'truncated':
        blobs[images] = blobs[images][:40]
    elif damage == 'wrong_magic':
        blobs[images] = gzip.compress(b'\x01\x02' + _idx(arrays[images])[2:])
    elif damage == 'counts':
        blobs[labels] = gzip.compress(_idx(np.zeros(39, np.uint8)))
    elif damage == 'labels':
        blobs[labels] = gzip.compress(_idx(np.full(40, 42, np.uint8)))
    for name, blob in blobs.items():
        with open(os.path.join(directory, name + '.gz'), 'wb') as f:
            f.write(blob)


def _digits_config(**changes) -> dict:
    """config.json of a run of FLAGS, with `changes`."""
    sys.path.insert(0, REPO)
    from spafl_jax.configs import default  # pylint: disable=import-outside-toplevel

    config = default.get_config()
    config.update(
        num_clients=6,
        clients_per_round=3,
        rounds=ROUNDS,
        local_epochs=1,
        checkpoint_every=2,
        sparsity_rounds=(1,),
        **changes,
    )
    return json.loads(json.dumps(config.to_dict()))


@dataclasses.dataclass(frozen=True)
class Case:
    """One subprocess run: `args` after the workdir, `prepare(root, workdir)` before it."""

    name: str
    args: tuple[str, ...] = ()
    expect: str = ''  # in the one line of output
    status: int = 2
    prepare: Callable[[str, str], Callable[[], None] | None] | None = None
    flags: tuple[str, ...] = FLAGS


def _write(path: str, data: bytes | str) -> None:
    with open(path, 'wb') as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _with_user_file(_, workdir):
    os.makedirs(workdir, exist_ok=True)
    _write(os.path.join(workdir, 'notes.txt'), 'a file of the user, not of the run\n')


def _other_config(_, workdir):
    _with_user_file(_, workdir)
    _write(os.path.join(workdir, 'config.json'), json.dumps(_digits_config(lr=0.2)))
    _write(os.path.join(workdir, 'metrics.jsonl'), '{"round": 1, "accuracy": 0.5}\n')


def _garbage_config(_, workdir):
    _with_user_file(_, workdir)
    _write(os.path.join(workdir, 'config.json'), '{"lr": 0.1, ')


def _busy(_, workdir):
    _with_user_file(_, workdir)
    f = open(os.path.join(workdir, '.lock'), 'a+')  # pylint: disable=consider-using-with
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write(f'pid {os.getpid()} on this machine\n')
    f.flush()
    return f.close


def _config_file(text):
    def prepare(root, workdir):
        _with_user_file(root, workdir)
        _write(os.path.join(root, 'my_config.py'), text)

    return prepare


def _fashion(damage):
    def prepare(root, workdir):
        _with_user_file(root, workdir)
        os.makedirs(os.path.join(root, 'data'), exist_ok=True)
        _fashion_files(os.path.join(root, 'data'), damage)

    return prepare


def _data_file(root, workdir):
    _with_user_file(root, workdir)
    _write(os.path.join(root, 'data'), 'a file where a directory belongs')


_FMNIST = ('--config=fmnist.py', '--config.data_dir={root}/data')

INPUT_CASES = [
    # The config file and its argument.
    Case(
        'config file missing',
        ('--config=nosuch.py',),
        '--config=nosuch.py: the config file cannot be read',
    ),
    Case(
        'config file not Python',
        ('--config=' + os.path.join(REPO, 'README.md'),),
        'README.md; fix the file',
    ),
    Case(
        'config file with a syntax error',
        ('--config={root}/my_config.py',),
        'my_config.py',
        prepare=_config_file('def get_config(:\n'),
    ),
    Case(
        'config file without get_config',
        ('--config={root}/my_config.py',),
        'my_config.py',
        prepare=_config_file('x = 1\n'),
    ),
    Case(
        'config file that raises',
        ('--config={root}/my_config.py',),
        'my_config.py',
        prepare=_config_file('def get_config():\n    raise RuntimeError("broken")\n'),
    ),
    Case(
        'unknown preset argument', ('--config=fmnist.py:bogus',), 'takes no argument or "official"'
    ),
    # Fields and types.
    Case('unknown field', ('--config.foo=1',), "--config.foo=1: the config has no field 'foo'"),
    Case(
        'integer field given a word',
        ('--config.rounds=abc',),
        '--config.rounds=abc: must be an integer',
    ),
    Case('float field given a word', ('--config.lr=fast',), '--config.lr=fast: must be a number'),
    Case('tuple field given a word', ('--config.sparsity_rounds=abc',), 'sparsity_rounds'),
    Case('unknown flag', ('--rounds=3',), '--config.rounds=VALUE'),
    # Values.
    Case('unknown dataset', ('--config.dataset=mnist',), 'config.dataset'),
    Case('unknown model', ('--config.model=resnet50',), 'config.model'),
    Case('model too big for the images', ('--config.model=conv4',), 'config.model'),
    Case(
        'more sampled clients than clients',
        ('--config.clients_per_round=30',),
        'config.clients_per_round',
    ),
    Case('more clients than examples allow', ('--config.num_clients=1000',), 'config.num_clients'),
    Case('alpha zero', ('--config.alpha=0',), 'config.alpha'),
    Case('no rounds', ('--config.rounds=0',), 'config.rounds'),
    Case('negative batch size', ('--config.batch_size=-1',), 'config.batch_size'),
    Case('no local epochs', ('--config.local_epochs=0',), 'config.local_epochs'),
    Case('learning rate zero', ('--config.lr=0',), 'config.lr'),
    Case('learning rate infinite', ('--config.lr=inf',), 'config.lr=inf must be a finite number'),
    Case('th_coeff nan', ('--config.th_coeff=nan',), 'config.th_coeff=nan must be a finite number'),
    Case('clip nan', ('--config.clip=nan',), 'config.clip=nan must be a finite number'),
    Case('min_lr nan', ('--config.min_lr=nan',), 'config.min_lr=nan must be a finite number'),
    Case('max_loss zero', ('--config.max_loss=0',), 'config.max_loss'),
    Case('seed too large', ('--config.seed=99999999999999999999',), 'config.seed'),
    Case('unknown estimator', ('--config.estimator=ste',), 'config.estimator'),
    Case('unknown collapse check', ('--config.collapse_check=later',), 'config.collapse_check'),
    # Data files.
    Case('data_dir is a file', _FMNIST, 'is a file, not a directory', prepare=_data_file),
    Case('dataset missing', ('--config=cifar10.py', '--config.data_dir={root}'), 'cifar10'),
    Case('IDX file of garbage', _FMNIST, 'train-images', prepare=_fashion('garbage')),
    Case('IDX file truncated', _FMNIST, 'train-images', prepare=_fashion('truncated')),
    Case('IDX file with a wrong magic', _FMNIST, 'train-images', prepare=_fashion('wrong_magic')),
    Case('labels and images disagree in count', _FMNIST, 'train', prepare=_fashion('counts')),
    Case('labels out of range', _FMNIST, 'labels from 42', prepare=_fashion('labels')),
    # The workdir.
    Case(
        'workdir holds another config',
        (),
        'different config (lr: 0.2 -> 0.05)',
        prepare=_other_config,
    ),
    Case('workdir config.json is garbage', (), 'unreadable config.json', prepare=_garbage_config),
    Case('workdir busy with another run', (), 'is in use by another run', prepare=_busy),
    Case(
        'workdir is a file',
        ('--workdir={root}/data',),
        'is a file, not a directory',
        prepare=_data_file,
    ),
]

DIVERGENCE_CASES = [
    Case(
        'loss above max_loss',
        ('--config.max_loss=1',),
        'round 1: training loss',
        status=3,
        prepare=_with_user_file,
    ),
    Case(
        'thresholds blown up (th_coeff=1e9)',
        ('--config.th_coeff=1e9',),
        'the run diverged',
        status=3,
        prepare=_with_user_file,
    ),
]


def run_case(case: Case, root: str, timeout: float = 300) -> tuple[int, str, str, bool]:
    """Runs `case` in `root`; returns (status, its one line, stderr, files kept)."""
    workdir = os.path.join(root, 'run')
    cleanup = case.prepare(root, workdir) if case.prepare else None
    before = tree_digest(workdir) if os.path.isdir(workdir) else {}
    args = [a.format(root=root) for a in case.args]
    try:
        proc = subprocess.run(
            command(workdir, *args, flags=case.flags),
            capture_output=True,
            text=True,
            env=env(),
            timeout=timeout,
            check=False,
        )
    finally:
        if cleanup:
            cleanup()
    after = tree_digest(workdir) if os.path.isdir(workdir) else {}
    kept = all(after.get(k) == v for k, v in before.items())
    if case.status == 2:
        kept = kept and after == before  # refused before writing anything
    return proc.returncode, one_line(proc.stderr), proc.stderr, kept


# ------------------------------------------------------------------------------------------------
# Signals, kills and damaged files: the resumed run ends as an uninterrupted one.


def metrics_lines(workdir: str) -> int:
    path = os.path.join(workdir, 'metrics.jsonl')
    try:
        with open(path, 'rb') as f:
            return f.read().count(b'\n')
    except OSError:
        return 0


def run_until(
    workdir: str, lines: int, sig: int = signal.SIGKILL, *extra: str, timeout: float = 300
) -> tuple[int, str]:
    """Starts the run and sends `sig` once metrics.jsonl holds `lines` lines."""
    proc = subprocess.Popen(
        command(workdir, *extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    deadline = time.time() + timeout
    while metrics_lines(workdir) < lines and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None:
        raise AssertionError(f'run ended before {lines} lines: {proc.stderr.read()[-2000:]}')
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def finish(workdir: str, *extra: str, timeout: float = 600) -> str:
    proc = subprocess.run(
        command(workdir, *extra),
        capture_output=True,
        text=True,
        env=env(),
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f'status {proc.returncode}: {proc.stderr[-3000:]}')
    return proc.stderr


def kill_at_random(
    workdir: str, seed: int, kills: int, window: tuple[float, float]
) -> list[tuple[float, int]]:
    """Starts the run `kills` times and SIGKILLs it after a delay drawn uniformly from `window`
    (seconds; a seeded generator), unless it finished first. Returns (delay, status) per start."""
    rng = random.Random(seed)
    out = []
    for _ in range(kills):
        delay = rng.uniform(*window)
        proc = subprocess.Popen(
            command(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env()
        )
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.append((round(delay, 2), proc.returncode))
    return out


def _flip(path: str, offset: int) -> None:
    with open(path, 'r+b') as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _newest_checkpoint(workdir: str) -> str:
    directory = os.path.join(workdir, 'checkpoints')
    steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
    return os.path.join(directory, str(steps[-1]))


def _largest_file(directory: str) -> str:
    paths = [os.path.join(r, n) for r, _, names in os.walk(directory) for n in names]
    return max(paths, key=os.path.getsize)


def _torn_last_record(workdir, rng):
    path = os.path.join(workdir, 'metrics.jsonl')
    data = open(path, 'rb').read()
    start = data.rstrip(b'\n').rfind(b'\n') + 1
    os.truncate(path, rng.randrange(start + 1, len(data)))


def _garbage_line(workdir, rng):
    path = os.path.join(workdir, 'metrics.jsonl')
    lines = open(path, 'rb').read().splitlines(keepends=True)
    lines.insert(rng.randrange(1, len(lines)), b'\x00\xffgarbage\n')
    _write(path, b''.join(lines))


def _checkpoint_bytes(workdir, rng):
    path = _largest_file(_newest_checkpoint(workdir))  # the array data
    _flip(path, rng.randrange(os.path.getsize(path)))


def _progress_files(workdir: str) -> list[str]:
    """The files of the newest checkpoint's progress record (round, totals, digest)."""
    return [
        os.path.join(root, name)
        for root, _, names in os.walk(_newest_checkpoint(workdir))
        if 'progress' in root
        for name in names
    ]


def _checkpoint_counter(workdir, _):
    for path in _progress_files(workdir):
        text = open(path).read()
        _write(path, text.replace('"bits_up": ', '"bits_up": 1'))


def _checkpoint_missing_progress(workdir, _):
    for path in _progress_files(workdir):
        os.remove(path)


def _torn_tensorboard(workdir, rng):
    directory = os.path.join(workdir, 'tensorboard')
    path = os.path.join(directory, sorted(os.listdir(directory))[0])
    os.truncate(path, rng.randrange(1, os.path.getsize(path)))
    _write(os.path.join(directory, 'events.out.tfevents.0.stale'), b'stale events')


def _torn_figure(workdir, rng):
    path = os.path.join(workdir, 'sparsity_round_0001.png')
    os.truncate(path, rng.randrange(1, os.path.getsize(path)))


def _garbage_summary(workdir, _):
    _write(os.path.join(workdir, 'summary.json'), '{"accuracy": ')


def _stray_temporary(workdir, _):
    _write(os.path.join(workdir, STRAY), 'half a file')


# Damage done to a workdir: name -> (what it is, damage(workdir, rng)).
DAMAGES = {
    'torn_record': ('metrics.jsonl: last record torn at a random byte', _torn_last_record),
    'garbage_line': ('metrics.jsonl: a garbage line at a random place', _garbage_line),
    'checkpoint_bytes': (
        'newest checkpoint: a random byte of its arrays flipped',
        _checkpoint_bytes,
    ),
    'checkpoint_counter': ('newest checkpoint: a running counter changed', _checkpoint_counter),
    'checkpoint_progress': (
        'newest checkpoint: its progress record deleted',
        _checkpoint_missing_progress,
    ),
    'torn_tensorboard': (
        'tensorboard: event file torn at a random byte, a stale one added',
        _torn_tensorboard,
    ),
    'torn_figure': ('sparsity figure torn at a random byte', _torn_figure),
    'garbage_summary': ('summary.json garbage', _garbage_summary),
    'stray_temporary': ('a stray temporary file', _stray_temporary),
}
STRAY = '.summary.json.x1y2.tmp'  # left by _stray_temporary

# Files a finished run derives, all of which must equal an uninterrupted run's byte for byte.
DERIVED = (
    'metrics.jsonl',
    'final_state.msgpack',
    'accuracy.png',
    'density.png',
    'communication.png',
    'sparsity_round_0001.png',
    f'sparsity_round_{ROUNDS:04d}.png',
)


def summary_without_timings(workdir: str) -> dict:
    with open(os.path.join(workdir, 'summary.json')) as f:
        summary = json.load(f)
    return {k: v for k, v in summary.items() if not k.startswith('seconds_')}


def tensorboard_scalars(workdir: str) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in the run's event files, in file order."""
    from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=import-outside-toplevel

    directory = os.path.join(workdir, 'tensorboard')
    out = []
    for name in sorted(os.listdir(directory)):
        for event in event_file_loader.LegacyEventFileLoader(os.path.join(directory, name)).Load():
            out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return out


# ------------------------------------------------------------------------------------------------


def _signal_cases(root: str) -> list[tuple[str, int, str]]:
    """SIGTERM, SIGINT and a second SIGINT, each sent once metrics.jsonl has 2 lines."""
    out = []
    for name, sig, twice in (
        ('SIGTERM at round 2', signal.SIGTERM, False),
        ('SIGINT (Ctrl-C) at round 2', signal.SIGINT, False),
        ('a second Ctrl-C while saving', signal.SIGINT, True),
    ):
        workdir = tempfile.mkdtemp(dir=root)
        proc = subprocess.Popen(
            command(workdir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        while metrics_lines(workdir) < 2 and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(sig)
        if twice:
            time.sleep(0.05)
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        out.append((name, proc.returncode, one_line(err)))
    return out


def first_warning(stderr: str) -> str:
    """The message of the first absl warning line (`W1202 12:00:00.0 123 file.py:1] message`)."""
    for line in stderr.splitlines():
        if line[:1] == 'W' and line[1:5].isdigit() and '] ' in line:
            return line.split('] ', 1)[1]
    return '(no warning)'


def differences(workdir: str, reference: str) -> list[str]:
    """What of a finished run in `workdir` differs from the uninterrupted run's: derived files
    (byte for byte), the summary (timings aside), the TensorBoard scalars, temporary files left."""
    out = []
    for name in DERIVED:
        with (
            open(os.path.join(workdir, name), 'rb') as a,
            open(os.path.join(reference, name), 'rb') as b,
        ):
            if a.read() != b.read():
                out.append(name)
    if summary_without_timings(workdir) != summary_without_timings(reference):
        out.append('summary.json')
    if tensorboard_scalars(workdir) != tensorboard_scalars(reference):
        out.append('tensorboard scalars')
    out += [n for n in os.listdir(workdir) if n.endswith('.tmp') and n != STRAY]
    return out


def _damage_cases(root: str) -> list[tuple[str, int, str, str]]:
    """Each damage alone, on a run killed after 5 records (a finished run for summary.json), then
    the same command again: its status, its first warning, and whether it ended as the reference."""
    reference = os.path.join(root, 'reference')
    finish(reference)
    out = []
    for i, (name, (what, damage)) in enumerate(DAMAGES.items()):
        workdir = os.path.join(root, f'damage{i}')
        if name == 'garbage_summary':
            shutil.copytree(reference, workdir)
        else:
            run_until(workdir, 5)
        damage(workdir, random.Random(i))
        proc = subprocess.run(
            command(workdir), capture_output=True, text=True, env=env(), timeout=600, check=False
        )
        same = proc.returncode == 0 and not differences(workdir, reference)
        out.append((what, proc.returncode, first_warning(proc.stderr), 'yes' if same else 'NO'))
    return out


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for i, case in enumerate(INPUT_CASES + DIVERGENCE_CASES):
            case_root = os.path.join(root, str(i))
            os.makedirs(case_root)
            status, line, _, kept = run_case(case, case_root)
            ok = status == case.status and case.expect in line and kept
            rows.append((case.name, status, line, 'yes' if ok else 'NO'))
            print(f'{case.name}: {status} {line}', file=sys.stderr, flush=True)
        rows += [(n, s, l, 'yes' if s in (130, 143) else 'NO') for n, s, l in _signal_cases(root)]
        rows += [
            (f'{what}, then the same command', status, line, same)
            for what, status, line, same in _damage_cases(root)
        ]
    print('| case | exit | the one line | as promised |')
    print('|---|---|---|---|')
    for name, status, line, ok in rows:
        print(f'| {name} | {status} | `{line.replace("|", "/")}` | {ok} |')


if __name__ == '__main__':
    main()
