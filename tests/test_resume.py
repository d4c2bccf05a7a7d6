"""Long runs that survive: bit-exact resume after SIGKILL, preemption, torn checkpoints, bad state."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spafl_jax import checkpoint
from spafl_jax import execution
from spafl_jax import federated
from spafl_jax import models
from spafl_jax import client as client_lib
from spafl_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from spafl_jax.configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position

import faults  # conftest puts tests/ on the path  # pylint: disable=g-import-not-at-top,wrong-import-position
from faults import ROUNDS  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.slow  # end-to-end: deselect with -m 'not slow'

_command, _env, _lines, _run_until, _finish = (
    faults.command,
    faults.env,
    faults.metrics_lines,
    faults.run_until,
    faults.finish,
)


def _read(workdir, name):
    with open(os.path.join(workdir, name), 'rb') as f:
        return f.read()


def test_sigkill_at_several_points_then_resume_is_bit_exact(reference, tmp_path):
    workdir = str(tmp_path / 'killed')
    # Before the first checkpoint, just after one, and late in the run.
    for kill_after_lines in (1, 3, 7):
        code, _ = _run_until(workdir, kill_after_lines)
        assert code == -signal.SIGKILL
        text = _read(workdir, 'metrics.jsonl')
        assert text.endswith(b'\n') or text == b''  # never a half line
    _finish(workdir)
    assert _read(workdir, 'metrics.jsonl') == _read(reference, 'metrics.jsonl')
    assert _read(workdir, 'final_state.msgpack') == _read(reference, 'final_state.msgpack')
    rounds = [json.loads(l)['round'] for l in _read(workdir, 'metrics.jsonl').splitlines()]
    assert rounds == list(range(1, ROUNDS + 1))  # no round twice


def test_disk_store_killed_twice_resumes_to_the_device_runs_records(reference, tmp_path):
    # The clients live in <workdir>/clients, written every round; killed after round 3 (the
    # checkpoint is of round 2: round 3's writes are undone on resume) and after round 5.
    workdir = str(tmp_path / 'disk')
    for kill_after_lines in (3, 5):
        code, _ = _run_until(
            workdir, kill_after_lines, signal.SIGKILL, '--config.client_store=disk'
        )
        assert code == -signal.SIGKILL
    _finish(workdir, '--config.client_store=disk')
    # The device tier's records, bit for bit: the store changes where clients live, nothing else.
    assert _read(workdir, 'metrics.jsonl') == _read(reference, 'metrics.jsonl')
    trained = {
        int(name.split('.')[0])
        for name in os.listdir(os.path.join(workdir, 'clients'))
        if name.endswith('.0')
    }
    assert trained and trained <= set(range(6))
    assert not os.path.exists(os.path.join(workdir, 'final_state.msgpack'))  # the store is it


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_preemption_signal_checkpoints_at_the_round_boundary(reference, tmp_path, sig):
    workdir = str(tmp_path / 'preempted')
    code, err = _run_until(workdir, 3, sig=sig)
    assert code == 128 + sig, err[-2000:]
    assert 'Traceback' not in err and 'resume' in err
    done = _lines(workdir)
    assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(done)))  # saved where it stopped
    _finish(workdir)
    assert _read(workdir, 'metrics.jsonl') == _read(reference, 'metrics.jsonl')
    assert _read(workdir, 'final_state.msgpack') == _read(reference, 'final_state.msgpack')


def test_a_finished_run_is_not_recomputed_and_a_different_config_is_refused(reference, tmp_path):
    workdir = str(tmp_path / 'copy')
    shutil.copytree(reference, workdir)
    before = _read(workdir, 'metrics.jsonl')
    _finish(workdir)
    assert _read(workdir, 'metrics.jsonl') == before
    proc = subprocess.run(
        _command(workdir, '--config.lr=0.01'),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 2 and 'different config' in proc.stderr and 'lr' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert _read(workdir, 'metrics.jsonl') == before


def _tiny_state(seed, clients=3):
    model = models.create_model('digits_cnn', 10)
    return federated.init_state(
        model,
        client_lib.LocalConfig(persistent_optimizer=True),
        jax.random.key(seed),
        num_clients=clients,
        image_shape=(8, 8, 1),
    )


def test_sharded_checkpoints_restore_onto_the_devices_or_through_the_host(tmp_path):
    # checkpoint_digest=False: saved as the state lies (sharded, asynchronously), restored onto
    # the target's sharding; a checkpoint of another client padding comes back as host arrays.
    def sharded(seed, clients):
        return execution.create_sharded(lambda: _tiny_state(seed, clients), clients)

    saved = sharded(0, 3)
    ckpt = checkpoint.Checkpointer(str(tmp_path), digest=False)
    ckpt.save(2, saved, {'round': 2, 'totals': {'steps': 5}})  # returns before it is on disk
    target = sharded(7, 3)
    state, progress = ckpt.restore_latest(target)
    assert progress == {'round': 2, 'totals': {'steps': 5}}  # no digest
    for a, b, t in zip(jax.tree.leaves(state), jax.tree.leaves(saved), jax.tree.leaves(target)):
        assert isinstance(a, jax.Array) and a.sharding == t.sharding
        np.testing.assert_array_equal(a, b)
    # 5 clients pad differently from 3 on any device count (1: 3 and 5; 2: 4 and 6; 4: 4 and 8).
    moved = checkpoint.Checkpointer(str(tmp_path), digest=False).restore_latest(sharded(7, 5))
    for a, b in zip(jax.tree.leaves(moved[0]), jax.tree.leaves(saved)):
        assert isinstance(a, np.ndarray) and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    ckpt.close()


# Orbax's failed read of the corrupt checkpoint leaves a callback for its closed asyncio loop, which
# fires at interpreter teardown ("Event loop is closed"); the fall-back itself is what is tested.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
    older, newer = _tiny_state(0), _tiny_state(1)
    ckpt.save(2, older, {'round': 2, 'totals': {}})
    ckpt.save(4, newer, {'round': 4, 'totals': {}})
    # Flip bytes in every data file of the newest checkpoint's arrays.
    for root, _, files in os.walk(tmp_path / '4' / 'state'):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 64 and 'METADATA' not in name:
                with open(path, 'r+b') as f:
                    f.seek(os.path.getsize(path) // 2)
                    chunk = f.read(16)
                    f.seek(os.path.getsize(path) // 2)
                    f.write(bytes(b ^ 0xFF for b in chunk))
    state, progress = ckpt.restore_latest(_tiny_state(7))
    assert progress['round'] == 2
    jax.tree.map(np.testing.assert_array_equal, state, older)
    # A truncated newest checkpoint (a file cut short) is also skipped.
    ckpt.save(6, newer, {'round': 6, 'totals': {}})
    for root, _, files in os.walk(tmp_path / '6' / 'state'):
        for name in files:
            if 'METADATA' not in name:
                path = os.path.join(root, name)
                os.truncate(path, os.path.getsize(path) // 3)
    _, progress = ckpt.restore_latest(_tiny_state(7))
    assert progress['round'] == 2  # 6 is truncated, 4 corrupt
    assert 'unusable' in caplog.text


def test_non_finite_state_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run_round = execution.RoundRunner.run_round

    def poisoned(self, state, sampled, seed_key):
        state, metrics = run_round(self, state, sampled, seed_key)
        if int(state.round) == 3:  # round 3 produces a NaN threshold
            bad = jax.tree.map(lambda t: t.at[0].set(jnp.nan), state.clients.thresholds)
            state = state.replace(clients=state.clients.replace(thresholds=bad))
        return state, metrics

    monkeypatch.setattr(execution.RoundRunner, 'run_round', poisoned)
    config = default.get_config()
    config.update(num_clients=6, clients_per_round=6, rounds=5, local_epochs=1, checkpoint_every=2)
    with pytest.raises(train.NonFiniteError, match=r'round 3: non-finite thresholds'):
        train.train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
    _, progress = checkpoint.Checkpointer(str(tmp_path / 'checkpoints')).restore_latest(
        train.Run(config).initial_state()
    )
    assert progress['round'] == 2
    assert [json.loads(l)['round'] for l in open(tmp_path / 'metrics.jsonl')] == [1, 2]


def test_unwritable_workdir_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = '/proc/spafl_cannot_write_here'  # root can write anywhere else
    else:
        os.chmod(tmp_path, 0o500)
        target = str(tmp_path / 'sub')
    config = default.get_config()
    config.update(rounds=1)
    with pytest.raises(train.WorkdirError, match='workdir'):
        train.train_and_evaluate(config, target)


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_changed_counter_is_detected_and_the_round_saved_again(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), max_to_keep=3)
    ckpt.save(2, _tiny_state(0), {'round': 2, 'totals': {'bits_up': 100}})
    ckpt.save(4, _tiny_state(1), {'round': 4, 'totals': {'bits_up': 200}})
    # One digit of a running total flipped in the newest checkpoint's progress record.
    paths = [
        os.path.join(root, name)
        for root, _, names in os.walk(tmp_path / 'checkpoints' / '4')
        for name in names
        if 'progress' in root
    ]
    assert paths
    for path in paths:
        text = open(path).read()
        if '200' in text:
            with open(path, 'w') as f:
                f.write(text.replace('200', '300'))
    _, progress = ckpt.restore_latest(_tiny_state(7))
    assert progress['round'] == 2 and progress['totals'] == {'bits_up': 100}
    # Set aside, not deleted; and round 4 can be saved again once recomputed.
    assert os.listdir(tmp_path / 'checkpoints.unusable') == ['4']
    ckpt.save(4, _tiny_state(1), {'round': 4, 'totals': {'bits_up': 200}})
    _, progress = ckpt.restore_latest(_tiny_state(7))
    assert progress['totals'] == {'bits_up': 200}


def test_a_second_ctrl_c_stops_at_once_with_one_line_and_the_run_still_resumes(tmp_path):
    workdir = str(tmp_path / 'twice')
    slow = '--config.local_epochs=30'  # rounds long enough for a second Ctrl-C to land in one
    proc = subprocess.Popen(
        _command(workdir, slow),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    lines, warned = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if 'SIGINT received' in line:
                warned.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 300
    while _lines(workdir) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert warned.wait(60), ''.join(lines)[-2000:]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    err = ''.join(lines)
    assert proc.returncode == 130, err[-2000:]
    assert 'Traceback' not in err
    assert [l.strip() for l in lines if 'interrupted again' in l] == [
        'interrupted again: stopped at once, without a checkpoint of this round; the same command '
        'resumes from the last one.'
    ]
    proc = subprocess.run(
        _command(workdir, slow), capture_output=True, text=True, env=_env(), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        assert [json.loads(l)['round'] for l in f] == list(range(1, ROUNDS + 1))


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_damaged_records_and_checkpoints_still_end_as_an_uninterrupted_run(reference, tmp_path):
    """A run killed late, then its files damaged as a crash or a careless hand would: the last
    metrics record loses its newline, a garbage line appears, a counter of the newest checkpoint
    changes, and summary.json is garbage. The resumed run ends byte for byte as the reference."""
    workdir = str(tmp_path / 'damaged')
    code, _ = _run_until(workdir, 5)
    assert code == -signal.SIGKILL
    metrics = os.path.join(workdir, 'metrics.jsonl')
    lines = _read(workdir, 'metrics.jsonl').splitlines(keepends=True)
    damaged = lines[:2] + [b'\x00garbage\n'] + lines[2:]
    damaged[-1] = damaged[-1].rstrip(b'\n')
    with open(metrics, 'wb') as f:
        f.write(b''.join(damaged))
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
        f.write('{"accuracy": ')
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
    newest = os.path.join(workdir, 'checkpoints', str(steps[-1]))
    for root, _, names in os.walk(newest):
        for name in names:
            path = os.path.join(root, name)
            if 'progress' in root:
                text = open(path).read()
                with open(path, 'w') as f:
                    f.write(text.replace('"bits_up": ', '"bits_up": 1'))
    _finish(workdir)
    assert _read(workdir, 'metrics.jsonl') == _read(reference, 'metrics.jsonl')
    assert _read(workdir, 'final_state.msgpack') == _read(reference, 'final_state.msgpack')
    assert _read(workdir, 'summary.json').startswith(b'{')
    assert os.listdir(os.path.join(workdir, 'checkpoints.unusable')) == [str(steps[-1])]
