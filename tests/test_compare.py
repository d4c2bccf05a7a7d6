"""experiments/compare.py: the table and curves from runs written by hand (exact numbers), and the
whole command on real digits."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import common
from experiments import compare
from spafl_jax.configs import default
# pylint: enable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.slow  # end-to-end: deselect with -m 'not slow'

COMPARE = os.path.join(REPO, 'experiments', 'compare.py')


def _write_run(workdir, method, seed, summary, accuracies):
    directory = compare.run_dir(str(workdir), method, seed)
    os.makedirs(directory)
    if summary is not None:
        with open(os.path.join(directory, 'summary.json'), 'w') as f:
            json.dump({'rounds': 3, 'round': 3, **summary}, f)
    with open(os.path.join(directory, 'metrics.jsonl'), 'w') as f:
        for r, accuracy in enumerate(accuracies, 1):
            f.write(json.dumps({'round': r, 'accuracy': accuracy, 'density': 1 - accuracy}) + '\n')


def _summary(accuracy, density, density_weighted, bits_up, bits_down, flops):
    return dict(
        accuracy=accuracy,
        density=density,
        density_weighted=density_weighted,
        bits_up=bits_up,
        bits_down=bits_down,
        flops=flops,
    )


def test_table_and_curves_from_hand_written_runs(tmp_path):
    _write_run(tmp_path, 'spafl', 1, _summary(0.8, 0.5, 0.25, 1e9, 3e9, 2e12), [0.5, 0.7, 0.8])
    _write_run(tmp_path, 'spafl', 2, _summary(0.9, 0.7, 0.35, 1e9, 3e9, 4e12), [0.6, 0.8, 0.9])
    _write_run(tmp_path, 'fedavg', 1, _summary(0.6, 1.0, 1.0, 5e10, 5e10, 6e12), [0.2, 0.4, 0.6])
    _write_run(tmp_path, 'fedavg', 2, _summary(0.7, 1.0, 1.0, 5e10, 5e10, 6e12), [0.3, 0.5, 0.7])
    # A diverged (or killed) run: metrics of two rounds, no summary.
    _write_run(tmp_path, 'local', 1, _summary(0.5, 1.0, 1.0, 0, 0, 6e12), [0.3, 0.5, 0.5])
    _write_run(tmp_path, 'local', 2, None, [0.1, 0.2])
    names, seeds = ('spafl', 'fedavg', 'local'), (1, 2)
    config = default.get_config()
    config.rounds = 3
    rows = compare.write_report(
        str(tmp_path), names, seeds, 'python experiments/compare.py ...', config
    )

    spafl, fedavg, local = rows
    assert spafl['method'] == 'spafl' and spafl['seeds'] == '1 2' and spafl['finished'] == 2
    assert spafl['accuracy_mean'] == np.mean([0.8, 0.9])
    assert spafl['accuracy_std'] == np.std([0.8, 0.9], ddof=1)
    assert spafl['density_mean'] == np.mean([0.5, 0.7])
    assert spafl['density_weighted_std'] == np.std([0.25, 0.35], ddof=1)
    assert (spafl['gbit_up'], spafl['gbit_down'], spafl['gbit_total']) == (1.0, 3.0, 4.0)
    assert spafl['flops_per_client'] == 3e12
    assert (fedavg['gbit_up'], fedavg['gbit_down'], fedavg['gbit_total']) == (50.0, 50.0, 100.0)
    assert fedavg['density_mean'] == 1.0 and fedavg['density_std'] == 0.0
    assert local['finished'] == 1 and np.isnan(local['accuracy_mean'])
    assert local['gbit_total'] != local['gbit_total']  # NaN: one seed has no result

    with open(tmp_path / 'comparison.md') as f:
        table = f.read()
    assert (
        '| method | accuracy (%) | communication (Gbit) | up (Gbit) | down (Gbit) | '
        'FLOPs per client (TFLOP) | density (%) | density, weights (%) |'
    ) in table
    assert '| spafl | 85.00 ± 7.07 | 4 | 1 | 3 | 3 | 60.00 ± 14.14 | 30.00 ± 7.07 |' in table
    assert '| fedavg | 65.00 ± 7.07 | 100 | 50 | 50 | 6 | 100.00 ± 0.00 | 100.00 ± 0.00 |' in table
    # Seed 1 finished, seed 2 did not: seed 1's values until seed 2 finishes, marked as its.
    assert (
        '| local (seed 2: stopped at round 2) | 50.00 (seed 1) | 0 | 0 | 0 | 6 | 100.00 (seed 1) | '
        '100.00 (seed 1) |'
    ) in table
    assert 'Command: `python experiments/compare.py ...`' in table
    # Along the run: round 3, where local's seed 2 (stopped at round 2) does not count.
    assert (
        '| spafl | 85.0 / 0.150 |\n| fedavg | 65.0 / 0.350 |\n| local | 50.0 / 0.500 (1) |' in table
    )

    with open(tmp_path / 'comparison.csv') as f:
        written = list(csv.DictReader(f))
    assert [r['method'] for r in written] == list(names)
    assert list(written[0]) == list(compare.CSV_COLUMNS)
    assert float(written[0]['accuracy_mean']) == spafl['accuracy_mean']  # full precision
    assert float(written[1]['gbit_total']) == 100.0
    assert float(written[0]['flops_per_client']) == 3e12

    curves = common.learning_curves(str(tmp_path), names, seeds)
    rounds, mean, std = curves['spafl']
    np.testing.assert_array_equal(rounds, [1, 2, 3])
    np.testing.assert_array_equal(
        mean, [np.mean([0.5, 0.6]), np.mean([0.7, 0.8]), np.mean([0.8, 0.9])]
    )
    np.testing.assert_array_equal(
        std, [np.std([0.5, 0.6], ddof=1), np.std([0.7, 0.8], ddof=1), np.std([0.8, 0.9], ddof=1)]
    )
    # Round 3 of `local` exists for seed 1 only: the mean of one seed, std 0.
    rounds, mean, std = curves['local']
    np.testing.assert_array_equal(rounds, [1, 2, 3])
    np.testing.assert_array_equal(mean, [np.mean([0.3, 0.1]), np.mean([0.5, 0.2]), 0.5])
    assert std[-1] == 0.0
    assert os.path.getsize(tmp_path / 'learning_curves.png') > 0


def test_finished_summary_judges_a_record_as_the_runner_does(tmp_path):
    """A field added to the config since a run was recorded counts at the value that run had;
    the stored form (lazy_importance) does not count; any other difference makes it unfinished."""
    config = default.get_config()
    directory = tmp_path / 'run'
    os.makedirs(directory)
    with open(directory / 'summary.json', 'w') as f:
        json.dump({'accuracy': 0.5}, f)

    def record(**changes):
        fields = {k: v for k, v in config.to_dict().items() if k not in changes}
        fields.update({k: v for k, v in changes.items() if v is not None})
        with open(directory / 'config.json', 'w') as f:
            json.dump(fields, f)
        return common.finished_summary(str(directory), config)

    assert record() == {'accuracy': 0.5}
    assert config.max_loss == 1e6 and config.collapse_check == 'current'
    assert record(max_loss=None, collapse_check=None) == {'accuracy': 0.5}  # older record
    assert record(lazy_importance=not config.lazy_importance) == {'accuracy': 0.5}
    assert record(rounds=config.rounds - 1) is None
    assert record(max_loss=1e3) is None
    config.collapse_check = 'official'
    assert record(collapse_check=None) is None  # the older run checked 'current'


def test_flop_unit_follows_the_largest_value():
    assert compare.flop_unit([{'flops_per_client': 3e12}, {'flops_per_client': 2e15}]) == (
        'PFLOP',
        1e15,
    )
    assert compare.flop_unit([{'flops_per_client': 5e8}]) == ('MFLOP', 1e6)
    assert compare.flop_unit([{'flops_per_client': float('nan')}]) == ('MFLOP', 1e6)


# The tiny digits federation: 4 clients, 2 sampled per round, 2 rounds of 1 local epoch.
TINY = [
    '--config=default.py',
    '--config.num_clients=4',
    '--config.clients_per_round=2',
    '--config.rounds=2',
    '--config.local_epochs=1',
]
# digits_cnn: 38160 parameters (all masked weights, no BatchNorm), 122 thresholds.
NUM_PARAMS, NUM_THRESHOLDS = 38160, 122


def _command(*arguments):
    """experiments/compare.py with these arguments, in a process of its own (its flags are
    global)."""
    return subprocess.run(
        [sys.executable, COMPARE, *arguments],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
        check=False,
    )


def _compare(workdir, *flags):
    return _command(*TINY, '--methods=spafl,fedavg', '--seeds=1', f'--workdir={workdir}', *flags)


def test_compare_command_end_to_end_on_digits(tmp_path):
    """Needs train.py to run `config.method` (methods.get); until then the fedavg run is SpaFL."""
    workdir = tmp_path / 'compare'
    result = _compare(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '[1/2] method=spafl seed=1: running in' in result.stdout
    assert '[2/2] method=fedavg seed=1: running in' in result.stdout

    summaries = {}
    for method in ('spafl', 'fedavg'):
        directory = workdir / method / 'seed1'
        with open(directory / 'config.json') as f:
            config = json.load(f)
        assert (config['method'], config['seed'], config['rounds']) == (method, 1, 2)
        with open(directory / 'summary.json') as f:
            summaries[method] = json.load(f)
    rounds, sampled, clients = 2, 2, 4
    spafl, fedavg = summaries['spafl'], summaries['fedavg']
    assert spafl['bits_up'] == rounds * sampled * NUM_THRESHOLDS * 32
    assert spafl['bits_down'] == rounds * (sampled + clients) * NUM_THRESHOLDS * 32
    # FedAvg: every parameter each way, dense (these fail while train.py ignores config.method).
    assert fedavg['bits_up'] == fedavg['bits_down'] == rounds * sampled * NUM_PARAMS * 32
    assert fedavg['density'] == fedavg['density_weighted'] == 1.0

    with open(workdir / 'comparison.csv') as f:
        rows = {row['method']: row for row in csv.DictReader(f)}
    for method, summary in summaries.items():
        row = rows[method]
        assert float(row['accuracy_mean']) == summary['accuracy'] and row['finished'] == '1'
        assert float(row['gbit_total']) == (summary['bits_up'] + summary['bits_down']) / 1e9
        assert float(row['flops_per_client']) == summary['flops'] > 0
    with open(workdir / 'comparison.md') as f:
        table = f.read()
    accuracy = 100 * summaries['fedavg']['accuracy']
    assert f'| fedavg | {accuracy:.2f} |' in table  # one seed: no spread
    assert os.path.getsize(workdir / 'learning_curves.png') > 0

    # Run again: both runs are finished, so nothing trains, and the table is rewritten the same;
    # --records_to copies their compact records, from which --records_only makes the same rows.
    records = tmp_path / 'records'
    result = _compare(workdir, f'--records_to={records}')
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('done before, skipped') == 2
    assert result.stdout.count('record copied to') == 2
    without_command = lambda text: [line for line in text.splitlines() if 'Command:' not in line]
    with open(workdir / 'comparison.md') as f:
        assert without_command(f.read()) == without_command(table)
    for method in ('spafl', 'fedavg'):
        assert sorted(os.listdir(records / method / 'seed1')) == [
            'config.json',
            'metrics.jsonl',
            'summary.json',
        ]
        for name in ('config.json', 'metrics.jsonl', 'summary.json'):
            with open(workdir / method / 'seed1' / name, 'rb') as a:
                with open(records / method / 'seed1' / name, 'rb') as b:
                    assert a.read() == b.read()
    result = _command(
        '--records_only', f'--workdir={records}', '--methods=spafl,fedavg', '--seeds=1'
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(records / 'comparison.md') as f:
        rebuilt = f.read()
    rows = lambda text: [line for line in text.splitlines() if line.startswith('| ')]
    assert rows(rebuilt) == rows(table)


def test_records_to_keeps_the_record_of_a_run_that_stops(tmp_path, monkeypatch):
    """A run stopped part-way (preempted, interrupted) has its record so far copied before the
    error goes on up; a finished one after it finishes."""

    def stopping(config, directory):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, 'config.json'), 'w') as f:
            json.dump(config.to_dict(), f)
        with open(os.path.join(directory, 'metrics.jsonl'), 'w') as f:
            f.write(json.dumps({'round': 1, 'accuracy': 0.25}) + '\n')
        os.makedirs(os.path.join(directory, 'checkpoints', '1'))
        raise KeyboardInterrupt

    monkeypatch.setattr(compare.train, 'train_and_evaluate', stopping)
    config = default.get_config()
    workdir, records = str(tmp_path / 'runs'), str(tmp_path / 'records')
    log = []
    with pytest.raises(KeyboardInterrupt):
        compare.run_comparison(config, workdir, ['spafl'], [3], log=log.append, records_to=records)
    kept = compare.run_dir(records, 'spafl', 3)
    assert sorted(os.listdir(kept)) == ['config.json', 'metrics.jsonl']  # no checkpoints
    with open(os.path.join(kept, 'metrics.jsonl')) as f:
        assert json.loads(f.read()) == {'round': 1, 'accuracy': 0.25}
    assert log[-1] == f'  record copied to {kept}'


def test_records_to_must_be_another_writable_folder(tmp_path):
    with pytest.raises(ValueError, match=r'^--records_to=.* is the --workdir itself'):
        common.check_records_to(str(tmp_path), str(tmp_path / '.'))
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    with pytest.raises(ValueError, match=r'^--records_to=.* cannot be made'):
        common.check_records_to(str(blocker / 'records'), str(tmp_path))
    common.check_records_to(str(tmp_path / 'new' / 'records'), str(tmp_path))
    assert os.path.isdir(tmp_path / 'new' / 'records')
    # From the command, before anything compiles: one line naming the flag.
    result = _command(*TINY, f'--workdir={tmp_path}', f'--records_to={tmp_path}')
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f'error: --records_to={tmp_path} is')


def _write_config(workdir, method, seed, **fields):
    config = default.get_config().to_dict()
    config.update(method=method, seed=seed, rounds=3, **fields)
    with open(os.path.join(compare.run_dir(str(workdir), method, seed), 'config.json'), 'w') as f:
        json.dump(config, f)


def test_records_only_rebuilds_the_report_from_compact_records(tmp_path):
    """What results/ holds of a run (config.json, metrics.jsonl, summary.json), and nothing runs:
    the methods' differing settings are listed under the table."""
    _write_run(tmp_path, 'spafl', 1, _summary(0.8, 0.5, 0.25, 1e9, 3e9, 2e12), [0.5, 0.7, 0.8])
    _write_config(tmp_path, 'spafl', 1, lr=0.01, th_coeff=0.005, dataset='fashion_mnist')
    _write_run(tmp_path, 'fedavg', 1, _summary(0.6, 1.0, 1.0, 5e10, 5e10, 6e12), [0.2, 0.4, 0.6])
    _write_config(tmp_path, 'fedavg', 1, lr=0.001, dataset='fashion_mnist')
    result = _command(
        '--records_only', f'--workdir={tmp_path}', '--methods=spafl,fedavg', '--seeds=1'
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / 'comparison.md') as f:
        table = f.read()
    assert table.startswith('# Comparison: fashion_mnist / digits_cnn, 3 rounds\n')
    # One seed: the values alone, no spread.
    assert '| spafl | 80.00 | 4 | 1 | 3 | 2 | 50.00 | 25.00 |' in table
    assert '| fedavg | 60.00 | 100 | 50 | 50 | 6 | 100.00 | 100.00 |' in table
    # The runs differ in lr and th_coeff; FedAvg ignores th_coeff, so only lr is a difference.
    assert '- spafl: lr 0.01\n- fedavg: lr 0.001\n' in table
    assert 'Command: `python experiments/compare.py --records_only' in table
    # Along the run: a 3-round config marks round 3 only.
    assert (
        '| method | round 3 |\n|---|---|\n| spafl | 80.0 / 0.200 |\n| fedavg | 60.0 / 0.400 |'
        in table
    )
    assert not os.path.exists(tmp_path / 'spafl' / 'seed1' / 'checkpoints')
    assert os.path.getsize(tmp_path / 'learning_curves.png') > 0

    result = _command(
        '--records_only', f'--workdir={tmp_path / "empty"}', '--methods=spafl', '--seeds=1'
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith('error: --records_only: no config.json in any of ')
    )
