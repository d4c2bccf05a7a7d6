"""experiments/fidelity.py: the official-against-ours table and figure, from run records alone."""

import json
import os

from experiments import fidelity


def _write(results, folder, curve, torn=False):
    os.makedirs(os.path.join(results, folder))
    with open(os.path.join(results, folder, 'metrics.jsonl'), 'w') as f:
        for r, (accuracy, density) in curve.items():
            f.write(json.dumps({'round': r, 'accuracy': accuracy, 'density': density}) + '\n')
        if torn:
            f.write('{"round": 3, "accur')   # a run killed mid-write


def test_table_compares_each_seed_and_their_mean(tmp_path):
    results = str(tmp_path)
    _write(results, 'official_fmnist_seed1', {1: (0.50, 0.90), 2: (0.60, 0.80)})
    _write(results, 'official_fmnist_seed2', {1: (0.70, 0.70), 2: (0.80, 0.60)})
    _write(results, 'fmnist_official_seed1', {1: (0.55, 0.85), 2: (0.62, 0.82)}, torn=True)
    _write(results, 'fmnist_official_seed2', {1: (0.75, 0.65)})
    _write(results, 'fmnist_official_current_seed1', {2: (0.40, 0.50)})
    runs = fidelity.load(results, ['1', '2'])
    assert sorted(runs) == [('current', '1'), ('official', '1'), ('official', '2'), ('ours', '1'),
                            ('ours', '2')]
    assert sorted(runs[('ours', '1')]) == [1, 2]   # the torn line is left out
    lines = fidelity.table(runs, ['1', '2'], [1, 2]).splitlines()
    assert lines[2] == '| 1 | 1 | 50.0 | 55.0 | +5.0 | 0.900 | 0.850 | -0.050 |'
    assert lines[4] == '| 1 | mean of 2 | 60.0 | 65.0 | +5.0 | 0.800 | 0.750 | -0.050 |'
    # Round 2 of our seed 2 was not reached: no mean over one seed.
    assert lines[6] == '| 2 | 2 | 80.0 | not reached | – | 0.600 | not reached | – |'
    assert len(lines) == 7
    current = fidelity.table(runs, ['1', '2'], [2], ours='current').splitlines()
    assert current[2] == '| 2 | 1 | 60.0 | 40.0 | -20.0 | 0.800 | 0.500 | -0.300 |'
    path = str(tmp_path / 'fidelity.png')
    fidelity.plot(runs, ['1', '2'], path)
    assert os.path.getsize(path) > 10_000
