"""research/fidelity.py: the official-against-ours table and figure, from run records alone."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # end-to-end: deselect with -m 'not slow'

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESEARCH = os.path.join(REPO, 'research')


def _write(results, folder, curve, torn=False):
    os.makedirs(os.path.join(results, folder))
    with open(os.path.join(results, folder, 'metrics.jsonl'), 'w') as f:
        for r, (accuracy, density) in curve.items():
            f.write(json.dumps({'round': r, 'accuracy': accuracy, 'density': density}) + '\n')
        if torn:
            f.write('{"round": 3, "accur')  # a run killed mid-write


def test_table_compares_each_seed_and_their_mean(tmp_path):
    results = str(tmp_path)
    _write(results, 'official_fmnist_seed1', {1: (0.50, 0.90), 2: (0.60, 0.80)})
    _write(results, 'official_fmnist_seed2', {1: (0.70, 0.70), 2: (0.80, 0.60)})
    _write(results, 'fmnist_official_seed1', {1: (0.55, 0.85), 2: (0.62, 0.82)}, torn=True)
    _write(results, 'fmnist_official_seed2', {1: (0.75, 0.65)})
    _write(results, 'fmnist_official_current_seed1', {2: (0.40, 0.50)})
    _write(results, 'fmnist_official_paired_seed1', {1: (0.52, 0.88), 2: (0.58, 0.81)})
    _write(results, 'fmnist_official_paired_rounding_seed1', {1: (0.53, 0.88), 2: (0.55, 0.80)})
    # A subprocess: the command's absl flags would clash with other experiment modules' here.
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(RESEARCH, 'fidelity.py'),
            f'--results={results}',
            '--rounds=1,2',
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = [l for l in result.stdout.splitlines() if l.startswith('|')]
    # The official code against ours: the torn last line of ours, seed 1, is left out.
    assert lines[2] == '| 1 | 1 | 50.0 | 55.0 | +5.0 | 0.900 | 0.850 | -0.050 |'
    assert lines[4] == '| 1 | mean of 2 | 60.0 | 65.0 | +5.0 | 0.800 | 0.750 | -0.050 |'
    assert lines[5] == '| 2 | 1 | 60.0 | 62.0 | +2.0 | 0.800 | 0.820 | +0.020 |'
    # Round 2 of our seed 2 was not reached: no mean over one seed.
    assert lines[6] == '| 2 | 2 | 80.0 | not reached | – | 0.600 | not reached | – |'
    # The second table: ours with collapse_check=current.
    assert 'ours with collapse_check=current:' in result.stdout
    assert '| 2 | 1 | 60.0 | 40.0 | -20.0 | 0.800 | 0.500 | -0.300 |' in lines[7:]
    # The third: ours on the official run's own draws, and how far apart the curves are.
    paired = result.stdout.split('ours on the official draws', 1)[1]
    assert '| 1 | 1 | 50.0 | 52.0 | +2.0 | 0.900 | 0.880 | -0.020 |' in paired
    assert (
        'seed 1, ours on the official draws against the official code, rounds 1-2: '
        'accuracy mean 2.00 / largest 2.0 points, density mean 0.015 / largest 0.020'
    ) in paired
    assert (
        'seed 1, ours against ours rounded differently, same draws, rounds 1-2: accuracy '
        'mean 2.00 / largest 3.0 points, density mean 0.005 / largest 0.010'
    ) in paired
    assert (
        'the official code, seed 1 against seed 2, rounds 1-2: accuracy mean 20.00 / largest '
        '20.0 points, density mean 0.200 / largest 0.200'
    ) in paired
    assert os.path.getsize(os.path.join(results, 'fidelity_fmnist_paired.png')) > 10_000
    assert os.path.getsize(os.path.join(results, 'fidelity_fmnist.png')) > 10_000


def _variant(results, name, rounds):
    folder = os.path.join(results, 'fidelity_diagnosis_seed1', name)
    os.makedirs(folder)
    with open(os.path.join(folder, 'metrics.jsonl'), 'w') as f:
        for r, (accuracy, fc4, resets) in rounds.items():
            f.write(
                json.dumps(
                    {
                        'round': r,
                        'accuracy': accuracy,
                        'official_accuracy': 0.5,
                        'layer_density': [1.0, fc4],
                        'official_layer_density': [1.0, 0.4],
                        'resets': [0, resets],
                        'official_resets': [0, 1],
                    }
                )
                + '\n'
            )


def test_diagnosis_sets_the_official_curve_against_an_ensemble_of_ours(tmp_path):
    results = str(tmp_path)
    _write(results, 'official_fmnist_seed1', {1: (0.50, 0.90), 5: (0.50, 0.80)})
    _variant(results, 'ours', {1: (0.52, 0.5, 0), 5: (0.55, 0.45, 0)})
    _variant(results, 'perturb1', {1: (0.49, 0.3, 1), 5: (0.58, 0.35, 2)})
    _variant(results, 'follow', {1: (0.40, 0.5, 1), 5: (0.45, 0.45, 1)})
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(RESEARCH, 'fidelity.py'),
            f'--results={results}',
            '--rounds=1',
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    diagnosed = result.stdout.split('the gap diagnosed', 1)[1]
    lines = [l for l in diagnosed.splitlines() if l.startswith('|')]
    assert lines[0] == (
        '| round | official | ours | perturb1 | follow | official inside the '
        'ensemble | fc4 density: official / ensemble | resets: official / '
        'ensemble |'
    )
    # Round 5 only (every 5 rounds, and the last): 50 lies below the ensemble's 55-58.
    assert lines[2:] == ['| 5 | 50.0 | 55.0 | 58.0 | 45.0 | no | 0.400 / 0.350-0.450 | 1 / 0-2 |']
    assert (
        'follow against the official code, rounds 1-5: accuracy mean 7.50 / largest 10.0 points'
    ) in diagnosed
    assert (
        'the ensemble (ours, perturb1): spread mean 3.00 / largest 3.0 points; the official '
        'curve inside its range in 1 of 2 rounds'
    ) in diagnosed
    assert os.path.getsize(os.path.join(results, 'fidelity_fmnist_diagnosis.png')) > 10_000


def test_the_ensemble_table_compares_the_official_curve_with_every_member():
    # Three members reach round 10, two of them round 20: each round compares the official curve
    # with the members that reached it.
    curves = {'ours': (0.50, 0.60), 'perturb1': (0.55, 0.70), 'perturb2': (0.52,)}
    variants = {
        name: {
            10 * (i + 1): {'accuracy': a, 'official_accuracy': 0.65}
            for i, a in enumerate(accuracies)
        }
        for name, accuracies in curves.items()
    }
    script = (
        'import json, sys\n'
        f'sys.path.insert(0, {RESEARCH!r})\n'
        'import fidelity\n'
        'variants = {n: {int(r): c for r, c in v.items()} for n, v in json.loads(sys.argv[1]).items()}\n'
        'print(json.dumps([fidelity.ensemble_table(variants), '
        'fidelity.ensemble_table({"ours": variants["ours"]})]))\n'
    )
    out = subprocess.run(
        [sys.executable, '-c', script, json.dumps(variants)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    table, alone = json.loads(out.stdout.splitlines()[-1])
    assert table.splitlines()[2:] == [
        '| 10 | 65.0 | 3 (ours, perturb1, perturb2) | 50.0 | 52.3 | 50.0-55.0 | no |',
        '| 20 | 65.0 | 2 (ours, perturb1) | 60.0 | 65.0 | 60.0-70.0 | yes |',
    ]
    assert alone == ''  # one run is no ensemble


def test_two_cpus_sets_each_code_against_itself(tmp_path):
    official_a = {r: {'accuracy': a, 'density': 0.5} for r, a in ((5, 0.50), (10, 0.70))}
    ours_a = {r: {'accuracy': a, 'density': 0.5} for r, a in ((5, 0.48), (10, 0.60))}
    diagnosed_b = {
        r: {'accuracy': a, 'density': 0.5, 'official_accuracy': o, 'official_density': 0.5}
        for r, a, o in ((5, 0.47, 0.49), (10, 0.61, 0.62))
    }
    path = str(tmp_path / 'cpus.png')
    script = (
        'import json, sys\n'
        f'sys.path.insert(0, {RESEARCH!r})\n'
        'import fidelity\n'
        'curves = [{int(r): c for r, c in v.items()} for v in json.loads(sys.argv[1])]\n'
        'fidelity.plot_two_cpus(*curves, sys.argv[2])\n'
        'print(json.dumps(fidelity.two_cpus(*curves)))\n'
    )
    out = subprocess.run(
        [sys.executable, '-c', script, json.dumps([official_a, ours_a, diagnosed_b]), path],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = json.loads(out.stdout.splitlines()[-1]).splitlines()
    assert lines[2:4] == [
        '| 5 | 50.0 | 49.0 | 48.0 | 47.0 | +1.0 |',
        '| 10 | 70.0 | 62.0 | 60.0 | 61.0 | +8.0 |',
    ]
    assert lines[4] == (
        '- official, CPU A against official, CPU B, rounds 1-10: accuracy mean 4.50 / '
        'largest 8.0 points'
    )
    assert lines[7] == (
        '- ours, CPU A against ours, CPU B, rounds 1-10: accuracy mean 1.00 / largest 1.0 points'
    )
    assert os.path.getsize(path) > 10_000


def test_precision_sets_the_codes_gap_against_a_code_moved_one_ulp(tmp_path):
    def curve(accuracy, official):
        return {
            r: {
                'accuracy': a,
                'official_accuracy': o,
                'density': 0.5,
                'layer_density': [0.5],
                'official_layer_density': [0.5],
                'clients_equal_accuracy': 100 if a == o else 90,
            }
            for r, (a, o) in enumerate(zip(accuracy, official), start=1)
        }

    float32 = {
        'ours': curve([0.30, 0.40, 0.50], [0.30, 0.405, 0.53]),
        'perturb1': curve([0.30, 0.41, 0.45], [0.30, 0.405, 0.53]),
    }
    float64 = {'ours': curve([0.30, 0.40, 0.50], [0.30, 0.40, 0.50])}
    path = str(tmp_path / 'precision.png')
    script = (
        'import json, sys\n'
        f'sys.path.insert(0, {RESEARCH!r})\n'
        'import fidelity\n'
        'p = {k: {n: {int(r): c for r, c in v.items()} for n, v in d.items()}\n'
        '     for k, d in json.loads(sys.argv[1]).items()}\n'
        'fidelity.plot_precision(p, sys.argv[2])\n'
        'print(json.dumps(fidelity.precision(p, rounds=(1, 2, 3))))\n'
    )
    out = subprocess.run(
        [sys.executable, '-c', script, json.dumps({'float32': float32, 'float64': float64}), path],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = json.loads(out.stdout.splitlines()[-1]).splitlines()
    assert lines[0] == (
        '| round | float32: official - ours | float32: ours - ours one ulp (1) | '
        'float64: official - ours |'
    )
    assert lines[3:5] == ['| 2 | 0.50 | 1.00 | 0.00 |', '| 3 | 3.00 | 5.00 | 0.00 |']
    assert lines[7] == (
        '- float32: ours - ours one ulp (1): first above 0.1 point at round 2, above '
        '1 point at round 3; mean over rounds 1-3 2.00'
    )
    assert lines[8].startswith('- float64: official - ours: first above 0.1 point at round > 3')
    assert 'at least 100 of 100 in every round 1-3' in lines[-1]
    assert os.path.getsize(path) > 10_000


def test_full_length_table_sets_the_official_code_against_our_defaults(tmp_path):
    """The 500-round records: accuracy / density at the marked rounds, the best and how far the
    last round lies below it; a record line without an evaluation is not a round of the table."""
    results = str(tmp_path)
    _write(
        results, 'official_fmnist500_seed1', {50: (0.60, 0.80), 100: (0.75, 0.70), 150: (0.70, 0.6)}
    )
    default = os.path.join('compare_fmnist500', 'spafl', 'seed1')
    _write(results, default, {50: (0.80, 0.90), 100: (0.90, 0.85)})
    with open(os.path.join(results, default, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps({'round': 101, 'density': 0.84}) + '\n')  # trained, not evaluated
    _write(results, os.path.join('compare_fmnist500', 'spafl', 'seed2'), {50: (0.82, 0.91)})
    result = subprocess.run(
        [sys.executable, os.path.join(RESEARCH, 'fidelity.py'), f'--results={results}'],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    with open(os.path.join(results, 'full_length_fmnist.md')) as f:
        document = f.read()
    rows = [line for line in document.splitlines() if line.startswith('| ')]
    assert rows == [
        '| code | seed | round 50 | round 100 | round 200 | round 300 | round 400 | round 500 '
        '| best (round) | last round | last - best (points) |',
        '| official PyTorch code (its FMNIST folder) | 1 | 60.0 / 0.800 | 75.0 / 0.700 | – | – '
        '| – | – | 75.0 (100) | 150 | -5.0 |',
        '| spafl_jax fmnist.py | 1 | 80.0 / 0.900 | 90.0 / 0.850 | – | – | – | – | 90.0 (100) '
        '| 100 | +0.0 |',
        '| spafl_jax fmnist.py | 2 | 82.0 / 0.910 | – | – | – | – | – | 82.0 (50) | 50 | +0.0 |',
    ]
    assert rows[1] in result.stdout
    assert os.path.getsize(os.path.join(results, 'full_length_fmnist.png')) > 10_000
