"""The runner end to end: learning on real digits, the files it writes, and bad input."""

import json
import os
import shutil
import re
import subprocess
import sys
import time

import pytest

from spafl_jax import configuration
from spafl_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from spafl_jax.configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.slow  # end-to-end: deselect with -m 'not slow'


def _config(**overrides):
    config = default.get_config()
    config.update(overrides)
    return config


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('digits'))
    config = _config(num_clients=10, clients_per_round=5, rounds=16, local_epochs=3, eval_every=4)
    return workdir, train.train_and_evaluate(config, workdir)


def test_learns_on_real_digits_and_sparsifies(digits_run):
    _, summary = digits_run
    assert summary['accuracy'] > 0.75  # chance is 0.1; this run reaches about 0.92
    assert summary['accuracy_weighted'] > 0.75
    assert summary['density'] < 0.95  # about 0.73 (rows), 0.36 (weights)
    assert summary['density_weighted'] < 0.9


def test_writes_metrics_summary_and_figures(digits_run):
    workdir, summary = digits_run
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        records = [json.loads(line) for line in f]
    assert [r['round'] for r in records] == [4, 8, 12, 16]
    for key in (
        'accuracy',
        'accuracy_weighted',
        'density',
        'density_weighted',
        'bits_up',
        'bits_down',
        'flops',
    ):
        assert all(key in r for r in records), key
    # Cumulative totals: 122 thresholds x 32 bits x 5 sampled clients per round.
    assert [r['bits_up'] for r in records] == [4 * 5 * 122 * 32 * k for k in (1, 2, 3, 4)]
    assert records[-1]['bits_down'] == 16 * (5 + 10) * 122 * 32
    assert records[0]['flops'] < records[-1]['flops']
    assert 0.0 < records[-1]['accuracy'] <= 1.0
    assert summary['round'] == 16 and summary['num_thresholds'] == 122
    with open(os.path.join(workdir, 'config.json')) as f:
        assert json.load(f)['rounds'] == 16
    for name in (
        'accuracy.png',
        'density.png',
        'communication.png',
        'sparsity_round_0016.png',
        'summary.json',
        'final_state.msgpack',
    ):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    assert any(
        f.startswith('events.out.tfevents')
        for f in os.listdir(os.path.join(workdir, 'tensorboard'))
    )


def test_refuses_a_workdir_that_holds_another_run(digits_run):
    workdir, _ = digits_run
    before = open(os.path.join(workdir, 'metrics.jsonl')).read()
    with pytest.raises(train.WorkdirError, match='different config'):
        train.train_and_evaluate(
            _config(
                num_clients=10, clients_per_round=5, rounds=16, local_epochs=3, eval_every=4, lr=0.2
            ),
            workdir,
        )
    with pytest.raises(train.WorkdirError, match='past config.rounds=4'):
        train.train_and_evaluate(
            _config(num_clients=10, clients_per_round=5, rounds=4, local_epochs=3, eval_every=4),
            workdir,
        )
    assert open(os.path.join(workdir, 'metrics.jsonl')).read() == before


def test_validation_names_allowed_values():
    with pytest.raises(configuration.ConfigError, match='digits_cnn, digits_mlp, lenet5'):
        configuration.validate(_config(model='resnet50'))
    with pytest.raises(configuration.ConfigError, match='long_tailed'):
        configuration.validate(_config(estimator='ste'))


def test_missing_dataset_fails_fast_with_the_places_looked_in(tmp_path):
    start = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, 'experiments', 'main.py'),
            '--config=cifar10.py',
            f'--config.data_dir={tmp_path}',
            '--config.download=False',
            f'--workdir={tmp_path}/w',
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert 'cifar10' in proc.stderr and str(tmp_path) in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert time.time() - start < 60


def test_readme_example_runs():
    with open(os.path.join(REPO, 'README.md')) as f:
        readme = f.read()
    blocks = re.findall(r'<!-- example -->\s*```python\n(.*?)```', readme, re.S)
    assert blocks, 'README.md lost its tested example'
    for block in blocks:
        exec(compile(block, 'README.md', 'exec'), {})  # pylint: disable=exec-used


def test_a_loss_above_max_loss_stops_the_run_as_diverged(tmp_path):
    # Cross-entropy of 10 classes starts near log(10) = 2.3: a bound of 1 stops the first round.
    with pytest.raises(
        train.NonFiniteError,
        match=r'round 1: training loss .* above '
        r'config.max_loss=1: the run diverged',
    ):
        train.train_and_evaluate(
            _config(num_clients=6, clients_per_round=3, rounds=2, local_epochs=1, max_loss=1.0),
            str(tmp_path),
        )
    assert (
        not os.path.exists(tmp_path / 'metrics.jsonl')
        or not (tmp_path / 'metrics.jsonl').read_text().strip()
    )
    # The compact record says so (tables of sweeps and comparisons read it).
    with open(tmp_path / train.DIVERGED_FILENAME) as f:
        diverged = json.load(f)
    assert (
        diverged['round'] == 1 and 'above config.max_loss=1: the run diverged' in diverged['error']
    )
    assert not os.path.exists(tmp_path / 'summary.json')


def test_a_busy_workdir_is_refused_and_a_dead_runs_lock_is_not_stuck(tmp_path):
    workdir = str(tmp_path / 'run')
    os.makedirs(workdir)
    holder = train.WorkdirLock(workdir)
    holder.acquire()  # another run, as far as the kernel is concerned (a separate open file)
    with pytest.raises(train.WorkdirError, match=r'in use by another run \(pid \d+ on '):
        train.train_and_evaluate(_config(rounds=1), workdir)
    holder.release()
    assert not os.path.exists(os.path.join(workdir, 'config.json'))  # refused before writing
    # A run killed while holding the lock (SIGKILL: no cleanup at all) leaves it free.
    script = (
        'import os, sys, time; from spafl_jax import train; '
        'lock = train.WorkdirLock(sys.argv[1]); lock.acquire(); print("locked", flush=True); '
        'time.sleep(600)'
    )
    proc = subprocess.Popen(
        [sys.executable, '-c', script, workdir], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert proc.stdout.readline().strip() == 'locked'
    with pytest.raises(train.WorkdirError, match='in use by another run'):
        train.WorkdirLock(workdir).acquire()
    proc.kill()
    proc.wait()
    with train.WorkdirLock(workdir):
        pass


def test_a_workdir_written_before_a_field_existed_resumes_with_its_old_value(tmp_path):
    workdir = str(tmp_path)
    config = _config(rounds=1)
    old = {k: v for k, v in config.to_dict().items() if k not in train.ADDED_FIELDS}
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
        json.dump(old, f)
    train.prepare_workdir(workdir, config, overwrite=False)  # the defaults: the old behaviour
    with pytest.raises(train.WorkdirError, match="collapse_check: 'current' -> 'previous'"):
        train.prepare_workdir(
            workdir, _config(rounds=1, collapse_check='previous'), overwrite=False
        )


def test_a_workdir_written_with_a_removed_field_still_resumes(tmp_path):
    """`eval_batch_size` was a required field that nothing read; workdirs that carry it resume,
    and the other fields are still compared."""
    workdir = str(tmp_path)
    config = _config(rounds=1)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
        json.dump({**config.to_dict(), 'eval_batch_size': 500}, f)
    assert 'eval_batch_size' not in config
    train.prepare_workdir(workdir, config, overwrite=False)
    with pytest.raises(train.WorkdirError, match='lr: 0.05 -> 0.1'):
        train.prepare_workdir(workdir, _config(rounds=1, lr=0.1), overwrite=False)


def test_a_garbage_summary_of_a_finished_run_is_rebuilt(digits_run, tmp_path):
    workdir, summary = digits_run
    copy = str(tmp_path / 'run')
    shutil.copytree(workdir, copy)
    with open(os.path.join(copy, 'summary.json'), 'w') as f:
        f.write('{"accuracy": 0.9')  # cut mid-write
    metrics = open(os.path.join(copy, 'metrics.jsonl')).read()
    rebuilt = train.train_and_evaluate(
        _config(num_clients=10, clients_per_round=5, rounds=16, local_epochs=3, eval_every=4), copy
    )
    assert rebuilt['accuracy'] == summary['accuracy'] and rebuilt['round'] == 16
    with open(os.path.join(copy, 'summary.json')) as f:
        assert json.load(f)['accuracy'] == summary['accuracy']
    assert open(os.path.join(copy, 'metrics.jsonl')).read() == metrics


def test_extending_a_finished_run_drops_its_summary_until_the_longer_run_finishes(
    tmp_path, monkeypatch
):
    workdir = str(tmp_path)
    small = dict(num_clients=4, clients_per_round=2, local_epochs=1, checkpoint_every=1)
    train.train_and_evaluate(_config(rounds=2, **small), workdir)
    assert os.path.exists(tmp_path / 'summary.json')
    # Extended to 4 rounds and stopped after round 3 (as a signal would stop it): the 2-round
    # summary must not stand for a run that now asks for 4.
    monkeypatch.setattr(train.execution, 'any_process', lambda flag: True)
    with pytest.raises(train.Preempted, match='after round 3'):
        train.train_and_evaluate(_config(rounds=4, **small), workdir)
    assert not os.path.exists(tmp_path / 'summary.json')
    monkeypatch.undo()
    summary = train.train_and_evaluate(_config(rounds=4, **small), workdir)
    assert summary['round'] == summary['rounds'] == 4
    with open(tmp_path / 'summary.json') as f:
        assert json.load(f)['round'] == 4


def test_seconds_per_round_after_a_resume_leave_out_compiling(tmp_path):
    """The steady pace is the whole run's, across resumes; rounds that compile do not count."""
    workdir = str(tmp_path)
    small = dict(num_clients=4, clients_per_round=2, local_epochs=1, eval_every=2)
    # Rounds 1 (compiles the round) and 2 (compiles the test) left out: 3 and 4 are steady.
    first = train.train_and_evaluate(_config(rounds=4, **small), workdir)
    assert first['seconds_first_round'] > first['seconds_per_round'] > 0
    # Extended: round 5 is this process's first, round 6 its first evaluation; both compile, so
    # the steady pace is still that of rounds 3 and 4, not the new process's compilation.
    extended = train.train_and_evaluate(_config(rounds=6, **small), workdir)
    assert extended['seconds_per_round'] == first['seconds_per_round']
    # Two more rounds: the resumed process now has steady rounds, and they count with the old.
    longer = train.train_and_evaluate(_config(rounds=9, **small), workdir)
    assert longer['seconds_per_round'] != first['seconds_per_round']
    assert longer['seconds_per_round'] < longer['seconds_first_round']


def test_a_run_resumes_in_the_stored_form_of_its_importance_update(tmp_path):
    # Started eager (as every run before the lazy form existed), resumed by a command whose
    # default is lazy: the run goes on in its checkpoints' form, and says the same as one run.
    workdir, whole = str(tmp_path / 'resumed'), str(tmp_path / 'whole')
    small = dict(num_clients=6, clients_per_round=3, local_epochs=1, eval_every=1)
    train.train_and_evaluate(_config(rounds=1, lazy_importance=False, **small), workdir)
    train.train_and_evaluate(_config(rounds=2, **small), workdir)
    train.train_and_evaluate(_config(rounds=2, lazy_importance=False, **small), whole)
    with open(os.path.join(workdir, 'config.json')) as f:
        assert json.load(f)['lazy_importance'] is False
    read = lambda d: [json.loads(line) for line in open(os.path.join(d, 'metrics.jsonl'))]  # noqa: E731
    assert [r['accuracy'] for r in read(workdir)] == [r['accuracy'] for r in read(whole)]


def test_more_clients_than_the_panel_evaluate_the_panel_and_sweep_now_and_then(tmp_path):
    config = _config(
        num_clients=12,
        clients_per_round=3,
        rounds=5,
        local_epochs=1,
        eval_every=1,
        eval_panel=4,
        eval_sweep_every=2,
    )
    summary = train.train_and_evaluate(config, str(tmp_path))
    with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
        records = [json.loads(line) for line in f]
    assert [r['evaluated_clients'] for r in records] == [4, 12, 4, 12, 12]  # the last: all
    assert summary['evaluated_clients'] == 12
    panel = train.evaluation_panel(config)
    assert len(panel) == 4 and list(panel) == sorted(set(panel.tolist()))
    assert train.evaluation_panel(_config(num_clients=12, eval_panel=12)) is None
    with pytest.raises(configuration.ConfigError, match='config.eval_panel >= '):
        configuration.validate(
            _config(num_clients=12, clients_per_round=3, eval_panel=4, collapse_check='previous')
        )


def test_the_host_takes_each_rounds_results_while_the_next_round_runs(tmp_path, monkeypatch):
    # Every round is dispatched before the host fetches the previous round's results, so the host
    # never waits for the device between rounds (only at checkpoints and at the end).
    from spafl_jax import execution  # pylint: disable=g-import-not-at-top

    events = []
    run_round = execution.RoundRunner.run_round

    def dispatched(self, state, sampled, key):
        events.append('dispatch')
        return run_round(self, state, sampled, key)

    fetch = execution.host_local
    monkeypatch.setattr(execution.RoundRunner, 'run_round', dispatched)
    monkeypatch.setattr(execution, 'host_local', lambda tree: events.append('fetch') or fetch(tree))
    config = _config(
        num_clients=6,
        clients_per_round=3,
        rounds=4,
        local_epochs=1,
        eval_every=1,
        checkpoint_every=100,
    )
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert events[:7] == ['dispatch', 'dispatch', 'fetch', 'dispatch', 'fetch', 'dispatch', 'fetch']
    assert events.count('dispatch') == 4
    with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
        assert [json.loads(line)['round'] for line in f] == [1, 2, 3, 4]
    assert summary['rounds'] == 4
