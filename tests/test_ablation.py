"""experiments/ablation.py on real digits: the table's rows, its numbers, and resuming."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # end-to-end: deselect with -m 'not slow'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATION = os.path.join(REPO, 'experiments', 'ablation.py')
# One estimator with the importance update on and off keeps the test short; the command's default is
# every estimator.
SETTINGS = [('long_tailed', 'all_after'), ('long_tailed', 'none')]
SEEDS = (1, 2)
TINY = [
    '--config=default.py',
    '--config.num_clients=4',
    '--config.clients_per_round=2',
    '--config.rounds=2',
    '--config.local_epochs=1',
    '--config.eval_every=2',
]


def _ablation(workdir: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            ABLATION,
            *TINY,
            '--seeds=1,2',
            '--estimators=long_tailed',
            '--importance_updates=all_after,none',
            f'--workdir={workdir}',
            *flags,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
    )


def _summary(workdir, estimator, importance_update, seed):
    path = os.path.join(workdir, f'{estimator}__{importance_update}', f'seed{seed}', 'summary.json')
    with open(path) as f:
        return json.load(f)


def test_ablation_table_matches_its_runs_and_resumes(tmp_path):
    workdir = str(tmp_path / 'ablation')
    result = _ablation(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(': running in ') == len(SETTINGS) * len(SEEDS)
    assert '[4/4] estimator=long_tailed importance_update=none seed=2' in result.stdout

    with open(os.path.join(workdir, 'ablation.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [(r['estimator'], r['importance_update']) for r in rows] == SETTINGS
    with open(os.path.join(workdir, 'ablation.md')) as f:
        table = f.read()
    assert 'Command: `python experiments/ablation.py --config=default.py' in table
    for row in rows:
        assert row['seeds'] == '1 2'
        for field in ('accuracy', 'density', 'density_weighted'):
            runs = [
                _summary(workdir, row['estimator'], row['importance_update'], s)[field]
                for s in SEEDS
            ]
            assert float(row[f'{field}_mean']) == np.mean(runs), (row, field)
            assert float(row[f'{field}_std']) == np.std(runs, ddof=1), (row, field)
        mean, std = float(row['accuracy_mean']), float(row['accuracy_std'])
        assert (
            f'| `{row["estimator"]}` | `{row["importance_update"]}` | '
            f'{100 * mean:.2f} ± {100 * std:.2f} |'
        ) in table
    # Each sub-run ran with its own setting and seed, and `none` sends no delta down.
    for estimator, importance_update in SETTINGS:
        for seed in SEEDS:
            with open(
                os.path.join(
                    workdir, f'{estimator}__{importance_update}', f'seed{seed}', 'config.json'
                )
            ) as f:
                config = json.load(f)
            assert (
                config['estimator'],
                config['importance_update'],
                config['seed'],
                config['rounds'],
            ) == (estimator, importance_update, seed, 2)
    on, off = (_summary(workdir, 'long_tailed', u, 1) for u in ('all_after', 'none'))
    assert on['bits_down'] > off['bits_down']

    # A killed ablation: one run finished, one left half-written. Only the unfinished one reruns.
    unfinished = os.path.join(workdir, 'long_tailed__none', 'seed2')
    os.remove(os.path.join(unfinished, 'summary.json'))
    finished_before = _summary(workdir, 'long_tailed', 'all_after', 1)
    # Resumed with --records_to: every run's compact record is copied there, checkpoints never.
    records = str(tmp_path / 'records')
    result = _ablation(workdir, f'--records_to={records}')
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('done before, skipped') == len(SETTINGS) * len(SEEDS) - 1
    assert result.stdout.count(': running in ') == 1
    assert 'estimator=long_tailed importance_update=none seed=2: running' in result.stdout
    assert _summary(workdir, 'long_tailed', 'all_after', 1) == finished_before
    assert result.stdout.count('  record copied to ') == len(SETTINGS) * len(SEEDS)
    for estimator, update in SETTINGS:
        for seed in SEEDS:
            assert sorted(
                os.listdir(os.path.join(records, f'{estimator}__{update}', f'seed{seed}'))
            ) == [
                'config.json',
                'metrics.jsonl',
                'summary.json',
            ]
            assert _summary(records, estimator, update, seed) == _summary(
                workdir, estimator, update, seed
            )


def test_records_only_table_from_compact_records_with_a_missing_run(tmp_path):
    """The table from hand-written records alone (nothing runs); a seed without a summary (killed
    or diverged) is NaN and named in the row."""
    accuracies = {
        ('identity', 'all_after', 1): 0.8,
        ('identity', 'all_after', 2): 0.9,
        ('identity', 'none', 1): 0.7,
    }
    for (estimator, update, seed), accuracy in accuracies.items():
        directory = tmp_path / f'{estimator}__{update}' / f'seed{seed}'
        os.makedirs(directory)
        with open(directory / 'config.json', 'w') as f:
            json.dump(
                {
                    'dataset': 'fashion_mnist',
                    'model': 'lenet5',
                    'rounds': 500,
                    'num_clients': 100,
                    'clients_per_round': 10,
                    'alpha': 0.2,
                    'batch_size': 64,
                    'local_epochs': 5,
                    'lr': 0.001,
                    'th_coeff': 0.002,
                    'estimator': estimator,
                    'importance_update': update,
                    'seed': seed,
                },
                f,
            )
        with open(directory / 'summary.json', 'w') as f:
            json.dump({'accuracy': accuracy, 'density': 0.5, 'density_weighted': 0.25}, f)
        with open(directory / 'metrics.jsonl', 'w') as f:
            f.write(json.dumps({'round': 500, 'accuracy': accuracy}) + '\n')
    result = subprocess.run(
        [
            sys.executable,
            ABLATION,
            '--records_only',
            f'--workdir={tmp_path}',
            '--seeds=1,2',
            '--estimators=identity',
            '--importance_updates=all_after,none',
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / 'ablation.md') as f:
        table = f.read()
    assert table.startswith('# Ablation: fashion_mnist / lenet5, 500 rounds\n')
    std = 100 * np.std([0.8, 0.9], ddof=1)
    assert f'| `identity` | `all_after` | 85.00 ± {std:.2f} | 50.00 ± 0.00 |' in table
    assert '| `identity` | `none` (seed 2: missing) | – | – | – |' in table
    assert os.path.getsize(tmp_path / 'ablation_curves.png') > 0


def test_a_stopped_ablation_ends_with_one_line_and_keeps_the_record(tmp_path):
    """SIGTERM (a preemption) stops the ablation at a round boundary: the runner's one line and
    128 + 15, as `main.py` ends, no traceback; the record so far is copied by --records_to."""
    workdir, records = str(tmp_path / 'ablation'), str(tmp_path / 'records')
    metrics = os.path.join(workdir, 'long_tailed__all_after', 'seed1', 'metrics.jsonl')
    proc = subprocess.Popen(
        [
            sys.executable,
            ABLATION,
            *TINY,
            '--config.rounds=500',
            '--config.eval_every=1',  # every round recorded: the stop's round has its record
            '--seeds=1',
            '--estimators=long_tailed',
            '--importance_updates=all_after',
            f'--workdir={workdir}',
            f'--records_to={records}',
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert 'Traceback' not in err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r'stopped by signal 15 after round \d+; checkpoint saved in .*: run the same command '
        r'to resume\.',
        last,
    ), last
    stopped_at = int(re.search(r'after round (\d+)', last).group(1))
    kept = os.path.join(records, 'long_tailed__all_after', 'seed1', 'metrics.jsonl')
    with open(kept) as f:
        assert json.loads(f.read().splitlines()[-1])['round'] == stopped_at
