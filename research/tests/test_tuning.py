"""research/tuning.py: the sweep's table from hand-written records (exact numbers)."""

import csv
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from spafl_jax.configs import fmnist
# pylint: enable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.slow  # a subprocess importing JAX: deselect with -m 'not slow'

TUNING = os.path.join(REPO, 'research', 'tuning.py')


def _write_run(runs, name, overrides, curve, finished):
    directory = runs / name
    os.makedirs(directory)
    config = fmnist.get_config().to_dict()
    config.update(overrides)
    with open(directory / 'config.json', 'w') as f:
        json.dump(config, f)
    with open(directory / 'metrics.jsonl', 'w') as f:
        for round_index, accuracy, density in curve:
            f.write(
                json.dumps({'round': round_index, 'accuracy': accuracy, 'density': density}) + '\n'
            )
    if finished:
        with open(directory / 'summary.json', 'w') as f:
            json.dump({'accuracy': curve[-1][1]}, f)


def test_table_from_records(tmp_path):
    runs = tmp_path / 'sweep'
    # Evaluated every 5 rounds; round 50 is read from round 50, round 100 from round 100.
    _write_run(
        runs,
        'a_fast',
        {'lr': 0.02, 'rounds': 100, 'eval_every': 5},
        [(5, 0.5, 0.9), (50, 0.85, 0.5), (95, 0.93, 0.4), (100, 0.92, 0.35)],
        True,
    )
    # Unfinished at round 60: round 100 is not reached yet; evaluated every 10 rounds, so round 55
    # would be read from round 50.
    _write_run(
        runs,
        'b_sparse',
        {'th_coeff': 0.01, 'estimator': 'identity'},
        [(10, 0.4, 0.8), (50, 0.7, 0.3), (60, 0.72, 0.28)],
        False,
    )
    _write_run(runs, 'c_default', {}, [(100, 0.8, 0.8)], True)
    _write_run(
        runs,
        'a_fast_seed2',
        {'lr': 0.02, 'rounds': 100, 'eval_every': 5, 'seed': 2},
        [(50, 0.8, 0.5), (100, 0.9, 0.4)],
        True,
    )
    _write_run(runs, 'd_diverged', {'lr': 0.1}, [(10, 0.3, 0.9)], False)
    # Finished at 100 rounds, then extended to 500 and stopped at round 120: its old summary is
    # of fewer rounds than its config asks for, so the run is not finished.
    _write_run(runs, 'e_extended', {'lr': 0.03}, [(100, 0.8, 0.5), (120, 0.82, 0.45)], False)
    with open(runs / 'e_extended' / 'summary.json', 'w') as f:
        json.dump({'round': 100, 'rounds': 100, 'accuracy': 0.8}, f)
    with open(runs / 'd_diverged' / 'diverged.json', 'w') as f:
        json.dump({'round': 12, 'error': 'round 12: non-finite loss'}, f)
    os.makedirs(runs / 'not_a_run')
    result = subprocess.run(
        [sys.executable, TUNING, f'--runs={runs}', '--config=fmnist.py', '--rounds=50,100'],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(runs / 'tuning.md') as f:
        table = f.read()
    assert '| a_fast | lr 0.02 | 85.0 / 0.500 | 92.0 / 0.350 | 93.0 (95) | 92.0 / 0.350 |' in table
    assert (
        '| b_sparse | estimator identity, th_coeff 0.01 | 70.0 / 0.300 | – / – | 72.0 (60) | '
        '72.0 / 0.280 (stopped at round 60 of 500) |'
    ) in table
    assert (
        '| d_diverged | lr 0.1 | – / – | – / – | 30.0 (10) | 30.0 / 0.900 (diverged at round 12 '
        'of 500) |' in table
    )
    assert '| c_default | (the reference) | – / – | 80.0 / 0.800 |' in table
    # a_fast again with seed 2: both seeds averaged in the table of seeds.
    assert '| lr 0.02 | 1 2 | 91.0 ± 1.4 | 0.375 ± 0.035 |' in table
    with open(runs / 'tuning.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['run'] for r in rows] == [
        'a_fast',
        'a_fast_seed2',
        'b_sparse',
        'c_default',
        'd_diverged',
        'e_extended',
    ]
    assert rows[4]['status'] == 'diverged at round 12'
    assert rows[5]['status'] == 'stopped at round 120'
    assert '82.0 / 0.450 (stopped at round 120 of 500) |' in table
    assert float(rows[0]['accuracy_best']) == 0.93 and rows[0]['best_round'] == '95'
    assert os.path.getsize(runs / 'tuning_curves.png') > 0

    result = subprocess.run(
        [sys.executable, TUNING, f'--runs={tmp_path / "none"}'],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith('error: --runs=')


def test_results_command_rebuilds_the_parts_whose_records_exist(tmp_path):
    """research/results.py: the tuning part from its records; parts without records skipped."""
    results = tmp_path / 'results'
    _write_run(
        results / 'tune_fmnist',
        'a_fast',
        {'lr': 0.02, 'rounds': 100},
        [(50, 0.85, 0.5), (100, 0.92, 0.35)],
        True,
    )
    # The document receives the tables between its include markers; the rest of it is kept.
    document = tmp_path / 'RESULTS.md'
    document.write_text(
        '# Results\n\nBefore.\n\n<!-- include results/tune_fmnist/tuning.md -->\n'
        'an old table\n<!-- end include -->\n\nBetween.\n\n'
        '<!-- include results/tune_fmnist/tuning.md from "| run |" -->\n'
        '<!-- end include -->\n<!-- include results/ablation_fmnist500/ablation.md'
        ' -->\nkept until built\n<!-- end include -->\nAfter.\n'
    )
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, 'research', 'results.py'),
            f'--results={results}',
            f'--document={document}',
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'== compare: no records in {results}/compare_fmnist500 yet, skipped' in result.stdout
    # The FMNIST part tables rounds 50, 100, 200, 300 and 500 (the last three not reached here).
    row = '| a_fast | lr 0.02 | 85.0 / 0.500 | 92.0 / 0.350 | – / – | – / – | – / – | 92.0 (100) |'
    with open(results / 'tune_fmnist' / 'tuning.md') as f:
        tuning = f.read()
    assert row in tuning and tuning.startswith('Command: `python research/tuning.py')
    text = document.read_text()
    whole, from_header = text.split('Between.')
    assert whole.startswith(
        '# Results\n\nBefore.\n\n<!-- include results/tune_fmnist/tuning.md'
        ' -->\nCommand: `python research/tuning.py'
    )
    assert row in whole and 'an old table' not in whole
    assert whole.endswith(f'{tuning.rstrip()}\n<!-- end include -->\n\n')
    table_start = tuning.index('| run |')
    assert (
        f'from "| run |" -->\n{tuning[table_start:].rstrip()}\n<!-- end include -->' in from_header
    )
    assert 'ablation.md -->\nkept until built\n<!-- end include -->\nAfter.\n' in from_header
    assert 'results/ablation_fmnist500/ablation.md not built yet' in result.stdout

    # A marker whose start line is not in the file is named with the fix.
    document.write_text(
        '<!-- include results/tune_fmnist/tuning.md from "Nowhere" -->\n<!-- end include -->\n'
    )
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, 'research', 'results.py'),
            f'--results={results}',
            f'--document={document}',
            '--only=tuning',
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1
    assert 'has no line beginning with "Nowhere": correct the include marker.' in result.stderr

    result = subprocess.run(
        [sys.executable, os.path.join(REPO, 'research', 'results.py'), '--only=tables'],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1 and '--only: unknown part(s) tables' in result.stderr
