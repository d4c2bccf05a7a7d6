"""Fault injection as real processes (`tests/faults.py`): every input error is one line with status 2
and touches nothing; kills at random moments and damaged files end as the uninterrupted run."""

import concurrent.futures
import os
import random
import shutil
import signal

import pytest

import faults  # conftest puts tests/ on the path  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.slow  # end-to-end: deselect with -m 'not slow'

CASES = faults.INPUT_CASES + faults.DIVERGENCE_CASES


@pytest.fixture(scope='module')
def outcomes(tmp_path_factory):
    """Every input and divergence case, two at a time (each is a short process of its own)."""
    root = str(tmp_path_factory.mktemp('cases'))

    def run(indexed):
        i, case = indexed
        case_root = os.path.join(root, str(i))
        os.makedirs(case_root)
        return faults.run_case(case, case_root)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(zip((c.name for c in CASES), pool.map(run, enumerate(CASES))))


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_a_mistake_is_one_line_with_its_status_and_keeps_every_file(outcomes, case):
    status, line, stderr, kept = outcomes[case.name]
    assert status == case.status, stderr[-2000:]
    assert 'Traceback' not in stderr, stderr[-2000:]
    assert len(faults.error_lines(stderr)) == 1, stderr[-2000:]
    assert line.startswith('error: ') and case.expect in line, line
    assert kept, 'a file that was in the workdir changed'


def _read(workdir, name):
    with open(os.path.join(workdir, name), 'rb') as f:
        return f.read()


def _assert_same_run(workdir, reference):
    """Every file a finished run derives equals the uninterrupted run's (timings aside)."""
    assert faults.differences(workdir, reference) == []


def test_sigkill_at_random_moments_resumes_to_the_uninterrupted_run(reference, tmp_path):
    workdir = str(tmp_path / 'killed')
    os.makedirs(workdir)
    with open(os.path.join(workdir, 'notes.txt'), 'w') as f:
        f.write('mine\n')
    starts = faults.kill_at_random(workdir, seed=0, kills=4, window=(1.0, 9.0))
    assert any(status == -signal.SIGKILL for _, status in starts), starts
    faults.finish(workdir)
    _assert_same_run(workdir, reference)
    assert _read(workdir, 'notes.txt') == b'mine\n'


def _damaged_run(workdir, names, seed):
    code, _ = faults.run_until(workdir, 5)
    assert code == -signal.SIGKILL
    kept = _read(workdir, 'metrics.jsonl').splitlines(keepends=True)[:4]  # before the checkpoint
    rng = random.Random(seed)
    for name in names:
        faults.DAMAGES[name][1](workdir, rng)
    faults.finish(workdir)
    assert _read(workdir, 'metrics.jsonl').startswith(b''.join(kept))


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_files_damaged_after_a_kill_are_repaired_or_recomputed(reference, tmp_path):
    """A torn record, a garbage line, a flipped byte in the newest checkpoint's arrays, a torn
    event file with a stale one beside it, a torn figure and a stray temporary file at once."""
    workdir = str(tmp_path / 'damaged')
    _damaged_run(
        workdir,
        (
            'torn_record',
            'garbage_line',
            'checkpoint_bytes',
            'torn_tensorboard',
            'torn_figure',
            'stray_temporary',
        ),
        seed=1,
    )
    _assert_same_run(workdir, reference)
    assert os.listdir(os.path.join(workdir, 'checkpoints.unusable'))  # set aside, not deleted


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_checkpoint_without_its_progress_record_is_set_aside(reference, tmp_path):
    workdir = str(tmp_path / 'progress')
    _damaged_run(workdir, ('checkpoint_progress',), seed=2)
    _assert_same_run(workdir, reference)


def test_every_derived_file_of_a_finished_run_is_rebuilt_not_trusted(reference, tmp_path):
    workdir = str(tmp_path / 'finished')
    shutil.copytree(reference, workdir)
    rng = random.Random(3)
    for name in ('garbage_summary', 'torn_tensorboard'):
        faults.DAMAGES[name][1](workdir, rng)
    os.truncate(os.path.join(workdir, 'accuracy.png'), 100)
    os.truncate(os.path.join(workdir, 'final_state.msgpack'), 1000)
    os.remove(os.path.join(workdir, 'sparsity_round_0001.png'))
    untouched = {
        n: os.stat(os.path.join(workdir, n)).st_mtime_ns
        for n in ('metrics.jsonl', 'density.png', 'communication.png')
    }
    faults.finish(workdir)
    _assert_same_run(workdir, reference)
    assert {n: os.stat(os.path.join(workdir, n)).st_mtime_ns for n in untouched} == untouched
