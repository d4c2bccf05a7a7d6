"""The console: its lines, the steady seconds per round, and what a run prints where."""

import io
import math
import os
import subprocess
import sys

import pytest

from spafl_jax import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bits_and_durations_read_at_a_glance():
    assert console.format_bits(512) == '512 bit'
    assert console.format_bits(234_240) == '234 kbit'
    assert console.format_bits(1_405_440) == '1.41 Mbit'
    assert console.format_bits(55.1e9) == '55.1 Gbit'
    assert console.format_bits(2.5e12) == '2.5 Tbit'
    assert console.format_duration(9.4) == '0:09'
    assert console.format_duration(4064) == '1:07:44'
    assert console.format_duration(float('nan')) == '?'


def test_round_line_has_the_pace_and_the_eta():
    stream = io.StringIO()
    out = console.Console(stream)
    record = {'accuracy': 0.8410, 'density': 0.8072, 'bits_up': 234_240, 'bits_down': 1_171_200}
    out.round_line(12, 50, record, 0.25)
    out.round_line(2, 50, record, float('nan'))
    first, second = stream.getvalue().splitlines()
    assert first.endswith(
        's  round 12/50 | accuracy 84.10% | density 80.72% | sent 1.41 Mbit | 0.25 s/round | '
        'ETA 0:10'
    )
    assert second.endswith(
        'round 2/50 | accuracy 84.10% | density 80.72% | sent 1.41 Mbit | compiling'
    )
    silent = io.StringIO()
    console.Console(silent, enabled=False).line('nothing')
    assert silent.getvalue() == ''


def test_round_timer_leaves_out_the_rounds_that_compile_and_survives_a_resume():
    timer = console.RoundTimer()
    timer.add(9.0, evaluated=False)  # the first round compiles the round
    timer.add(3.0, evaluated=True)  # the first evaluation compiles the test
    timer.add(1.0, evaluated=False)
    timer.add(2.0, evaluated=True)
    assert timer.first == 9.0
    assert timer.per_round() == 1.5 and timer.state() == {'seconds': 3.0, 'rounds': 2}

    resumed = console.RoundTimer(timer.state())  # a new process compiles again
    resumed.add(8.0, evaluated=True)
    assert resumed.per_round() == 1.5 and resumed.first == 8.0
    resumed.add(1.5, evaluated=True)
    assert resumed.per_round() == 1.5 and resumed.rounds == 3
    assert math.isnan(console.RoundTimer().per_round())


@pytest.mark.slow
def test_a_run_prints_progress_on_stdout_and_detail_only_when_asked(tmp_path):
    command = [
        sys.executable,
        os.path.join(REPO, 'experiments', 'main.py'),
        '--config.rounds=4',
        '--config.eval_every=2',
        # tests/faults.py's federation (FLAGS): the same compiled programs, which the persistent
        # compilation cache (tests/conftest.py) shares between this run and those.
        '--config.num_clients=6',
        '--config.clients_per_round=3',
        '--config.local_epochs=1',
        f'--workdir={tmp_path / "run"}',
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ''  # neither absl's INFO lines nor JAX's probe for a TPU
    lines = [line.split('s  ', 1)[1] for line in proc.stdout.splitlines()]
    assert (
        lines[0] == f'digits / digits_cnn: 6 clients, 3 per round, 4 rounds -> {tmp_path / "run"}'
    )
    assert lines[1:5] == [
        'loading digits',
        'splitting 1347 + 450 examples over 6 clients (Dirichlet alpha 0.5)',
        'initializing 6 clients (shared initial model)',
        'round 1 compiles (and the first evaluation)',
    ]
    assert lines[5].startswith('round 2/4 | accuracy ') and lines[5].endswith('| compiling')
    assert lines[6].startswith('round 4/4 | accuracy ') and ' s/round | ETA 0:00' in lines[6]
    assert lines[7].startswith('done: accuracy ') and lines[7].endswith(
        f'results in {tmp_path / "run"}'
    )

    # Extended by two rounds: the new process compiles again, and reports the steady pace.
    command[2] = '--config.rounds=6'
    proc = subprocess.run(
        command + ['--verbosity=0'], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'resuming after round 4' in proc.stdout
    assert 'train.py' in proc.stderr and 'round 6/6 | accuracy' in proc.stderr  # absl detail
