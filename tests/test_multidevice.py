"""The `clients` mesh: 1, 2 and 4 simulated CPU devices, and 2 processes on localhost, all giving the
results of one device, without retracing after the first round.

Each configuration runs in a fresh Python process, because the number of CPU devices and
`jax.distributed` can only be set before JAX first touches a device (this pytest process already has).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spafl_jax import algorithm as algorithm_lib
from spafl_jax import baselines
from spafl_jax import client as client_lib
from spafl_jax import data as data_lib
from spafl_jax import federated
from spafl_jax import layers

pytestmark = pytest.mark.slow  # end-to-end: deselect with -m 'not slow'

NUM_CLIENTS, SAMPLED, BATCH, ROUNDS = 8, 3, 16, 2  # 3 sampled over 2 or 4 devices: empty positions
PANEL = [6, 1, 3, 7]  # evaluated on their own: clients of three of four devices' shards, unsorted
# Every baseline: each is an `algorithm.Algorithm`, and runs on the same mesh as SpaFL.
ALGORITHM_BASELINES = ('fedavg', 'local', 'fedpm', 'heterofl', 'fedspa')

# Runs ROUNDS rounds with each strategy on a fresh state and saves every leaf of the final state,
# the round metrics and the evaluation, gathered to this host, plus each compiled function's number of
# traces. argv: out_path devices strategies [coordinator num_processes process_id].
WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    out, devices, strategies = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(',')
    from spafl_jax import execution
    if len(sys.argv) > 4:
        execution.initialize_runtime(coordinator_address=sys.argv[4], num_processes=int(sys.argv[5]),
                                     process_id=int(sys.argv[6]), num_cpu_devices=devices)
    else:
        execution.initialize_runtime(num_cpu_devices=devices)
    import test_multidevice as t
    results = {}
    for method in ('spafl',) + t.ALGORITHM_BASELINES:
        for strategy in strategies:
            name = strategy if method == 'spafl' else f'{method}/{strategy}'
            state, metrics, evaluation, traces = t.run_rounds(strategy, method)
            results.update(t.flatten(name, execution.host_local((state, metrics, evaluation))))
            results[name + '/traces'] = np.array(list(traces.values()))
    if jax.process_index() == 0:
        np.savez(out, **results)
    print('devices', len(jax.devices()), 'processes', jax.process_count(), flush=True)
""")


class TinyMLP(nn.Module):
    """Two masked dense layers: compiles in a fraction of a CNN's time, and sharding does not care."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(layers.MaskedDense(16)(x.reshape(x.shape[0], -1)))
        return layers.MaskedDense(10)(x)


def setup():
    dataset = data_lib.load_digits()
    train, test = federated.split_clients(dataset, NUM_CLIENTS, alpha=0.3, min_train_examples=BATCH)
    model = TinyMLP()
    # 'previous' carries a boolean flag per client and layer through the gathers and scatters.
    cfg = client_lib.LocalConfig(
        batch_size=BATCH, local_epochs=2, lr=0.05, th_coeff=0.01, collapse_check='previous'
    )
    spec = client_lib.DataSpec(pixel_max=16.0, mean=dataset.mean, std=dataset.std)
    round_cfg = federated.RoundConfig(clients_per_round=SAMPLED, aggregation='data_size')
    return train, test, model, cfg, spec, round_cfg


def sampled_clients(r: int) -> np.ndarray:
    return np.sort(np.random.default_rng([5, r]).choice(NUM_CLIENTS, SAMPLED, replace=False))


def flatten(prefix: str, tree) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {prefix + jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


_INITIAL = {}


def initial_state(method: str = 'spafl'):
    """One compiled initialization per process (it costs more than a round of the tiny model);
    a fresh copy each time, since rounds donate their input state."""
    if method not in _INITIAL:
        _, _, model, cfg, *_ = setup()
        if method == 'spafl':
            state = federated.init_state(  # the lazy importance update, the default
                model,
                cfg,
                jax.random.key(3),
                num_clients=NUM_CLIENTS,
                image_shape=(8, 8, 1),
                lazy_importance=True,
            )
        else:
            state = baselines.get(method).init_state(
                model, cfg, jax.random.key(3), num_clients=NUM_CLIENTS, image_shape=(8, 8, 1)
            )
        _INITIAL[method] = state
    return jax.tree.map(jnp.copy, _INITIAL[method])


def run_rounds(strategy: str, method: str = 'spafl'):
    """ROUNDS rounds of `method` and an evaluation on whatever devices this process has."""
    from spafl_jax import execution  # pylint: disable=g-import-not-at-top

    train, test, model, cfg, spec, round_cfg = setup()
    algorithm = (
        None if method == 'spafl' else baselines.get(method).algorithm(model, cfg, round_cfg)
    )
    runner = execution.RoundRunner(
        model,
        cfg,
        round_cfg,
        spec,
        train,
        test,
        strategy=strategy,
        lanes=2,
        eval_chunk=16,
        algorithm=algorithm,
    )
    state = initial_state(method)
    for r in range(ROUNDS):
        state, metrics = runner.run_round(state, sampled_clients(r), jax.random.key(1))
    evaluation = runner.evaluate(state)
    panel = runner.evaluate_panel(state, PANEL)
    evaluation = {
        **evaluation,
        'panel_correct': panel['correct'],
        'panel_density': panel['layer_density'],
    }
    return state, metrics, evaluation, runner.trace_counts()


def reference(method: str = 'spafl'):
    """`federated.run_round` (or the baseline's `run_round`) on one device: what every mesh must
    reproduce."""
    train, test, model, cfg, spec, round_cfg = setup()
    if method == 'spafl':
        round_fn = federated.make_round_fn(model, cfg, round_cfg, spec)
        evaluate = lambda state: federated.make_eval_fn(model, spec, batch_size=64, cfg=cfg)(
            state.clients, test
        )
    else:
        alg = baselines.get(method).algorithm(model, cfg, round_cfg)
        round_fn = algorithm_lib.make_round_fn(
            alg,
            cfg,
            spec,
            aggregation=round_cfg.aggregation,
            client_execution=round_cfg.client_execution,
        )
        evaluate = lambda state: algorithm_lib.make_eval_fn(alg, spec, batch_size=64)(state, test)
    state = initial_state(method)
    for r in range(ROUNDS):
        state, _ = round_fn(state, train, jnp.asarray(sampled_clients(r)), jax.random.key(1))
    return flatten('', jax.device_get(state)), jax.device_get(evaluate(state))


def _spawn(tmp_path, name: str, devices: int, strategies: str, *distributed: str):
    env = dict(
        os.environ,
        PYTHONPATH=os.path.dirname(__file__) + os.pathsep + os.environ.get('PYTHONPATH', ''),
    )
    env.pop('XLA_FLAGS', None)
    out = str(tmp_path / f'{name}.npz')
    return out, subprocess.Popen(
        [sys.executable, '-c', WORKER, out, str(devices), strategies, *distributed],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process, timeout: float = 900) -> str:
    # Generous: three workers compile every strategy of every method at once on CI's two cores
    # (300 s was once too little); what is tested is their results, not their speed.
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def _check(results: dict, ref_state: dict, ref_eval: dict, strategy: str) -> None:
    assert ref_state, 'a state without leaves compares nothing'
    for key, value in ref_state.items():
        # Messages and metrics added in client-id order: the same bits on any mesh.
        np.testing.assert_array_equal(
            results[f'{strategy}[0]{key}'], value, err_msg=f'{strategy}: {key}'
        )
    np.testing.assert_array_equal(results[f"{strategy}[2]['correct']"], ref_eval['correct'])
    np.testing.assert_allclose(
        results[f"{strategy}[2]['layer_density']"], ref_eval['layer_density']
    )
    np.testing.assert_array_equal(
        results[f"{strategy}[2]['panel_correct']"], ref_eval['correct'][PANEL]
    )
    np.testing.assert_allclose(
        results[f"{strategy}[2]['panel_density']"], ref_eval['layer_density'][PANEL]
    )
    # Every compiled function traced once: later rounds reuse the first round's executables.
    assert results[f'{strategy}/traces'].tolist() == [1] * len(results[f'{strategy}/traces'])


@pytest.fixture(scope='module')
def ref():
    return reference()


@pytest.fixture(scope='module')
def baseline_refs():
    return {method: reference(method) for method in ALGORITHM_BASELINES}


def test_one_two_and_four_devices_give_the_one_device_results(tmp_path, ref, baseline_refs):
    """SpaFL, and every baseline written as an `algorithm.Algorithm`, with every strategy."""
    jobs = {devices: _spawn(tmp_path, f'd{devices}', devices, 'map,vmap') for devices in (1, 2, 4)}
    for devices, (out, process) in jobs.items():
        assert f'devices {devices} processes 1' in _finish(process)
        results = dict(np.load(out))
        for strategy in ('map', 'vmap'):
            _check(results, *ref, strategy)
            for method, method_ref in baseline_refs.items():
                _check(results, *method_ref, f'{method}/{strategy}')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost_give_the_one_process_results(tmp_path, ref, baseline_refs):
    # Two processes with 2 CPU devices each: a 4-device mesh whose psum crosses processes (gloo).
    address = f'127.0.0.1:{_free_port()}'
    jobs = [_spawn(tmp_path, f'p{i}', 2, 'map,vmap', address, '2', str(i)) for i in range(2)]
    outputs = [_finish(process) for _, process in jobs]
    assert all('devices 4 processes 2' in output for output in outputs), outputs
    results = dict(np.load(jobs[0][0]))
    for strategy in ('map', 'vmap'):
        _check(results, *ref, strategy)
        for method, method_ref in baseline_refs.items():
            _check(results, *method_ref, f'{method}/{strategy}')


_MAIN = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments', 'main.py'
)
# The embedded default, small: 8 clients split over 4 devices, a checkpoint after round 2.
_SMALL_RUN = (
    '--config.num_clients=8',
    '--config.clients_per_round=3',
    '--config.local_epochs=1',
    '--config.checkpoint_every=2',
    '--config.sparsity_rounds=(1,)',
)


def _main(workdir, rounds: int, *flags: str, env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, **(env or {}))
    env.pop('XLA_FLAGS', None)
    return subprocess.Popen(
        [
            sys.executable,
            _MAIN,
            f'--workdir={workdir}',
            *_SMALL_RUN,
            f'--config.rounds={rounds}',
            *flags,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_two_processes_run_and_resume_the_training_command_like_one(tmp_path):
    """`experiments/main.py` as two processes sharing a workdir: process 0 writes the files, both
    take part in the checkpoints, and a resumed run restores on both and goes on as one process."""
    single, multi = tmp_path / 'single', tmp_path / 'multi'
    for rounds in (3, 4):  # 3 rounds (checkpoints 2 and 3), then resumed from 3 up to 4 rounds
        address = f'127.0.0.1:{_free_port()}'
        jobs = [_main(single, rounds)] + [
            _main(
                multi,
                rounds,
                f'--config.coordinator_address={address}',
                '--config.num_processes=2',
                f'--config.process_id={i}',
                '--config.num_cpu_devices=2',
            )
            for i in range(2)
        ]
        outputs = [_finish(job) for job in jobs]
    assert 'resuming after round 3' in outputs[1], outputs[1][-2000:]
    expected, got = _metrics(single), _metrics(multi)
    assert [r['round'] for r in got] == [1, 2, 3, 4]
    for want, have in zip(expected, got):
        for key in ('accuracy', 'density', 'density_weighted', 'bits_up', 'bits_down'):
            assert have[key] == pytest.approx(want[key], abs=1e-6), (want['round'], key)
        assert have['train_loss'] == pytest.approx(want['train_loss'], rel=1e-4)
    for name in ('summary.json', 'final_state.msgpack', 'sparsity_round_0001.png', 'accuracy.png'):
        assert (multi / name).exists(), name
    assert sorted(os.listdir(multi / 'checkpoints')) == ['3', '4']


def _slurm_port() -> int:
    """A free port among those JAX's Slurm detection picks from: 61440 + (job id mod 4096)."""
    for port in range(61440 + os.getpid() % 4096, 65536):
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', port))
            except OSError:
                continue
            return port
    raise RuntimeError('no free port in 61440..65535')


def test_two_processes_found_by_distributed_auto_run_like_one(tmp_path):
    """`--config.distributed=auto`: the same command on both processes, which learn the
    coordinator, their number and their index from the platform, here a Slurm job step of two
    tasks on this host (the variables `srun` sets)."""
    single, multi = tmp_path / 'single', tmp_path / 'multi'
    job = _slurm_port() - 61440
    slurm = lambda i: {  # noqa: E731
        'SLURM_JOB_ID': str(job),
        'SLURM_STEP_NODELIST': 'localhost',
        'SLURM_NTASKS': '2',
        'SLURM_PROCID': str(i),
        'SLURM_LOCALID': str(i),
    }
    jobs = [_main(single, 2)] + [
        _main(multi, 2, '--config.distributed=auto', '--config.num_cpu_devices=2', env=slurm(i))
        for i in range(2)
    ]
    outputs = [_finish(job) for job in jobs]
    assert 'process 0 of 2' in outputs[1] and 'process 1 of 2' in outputs[2], outputs[1][-2000:]
    expected, got = _metrics(single), _metrics(multi)
    assert [r['round'] for r in got] == [1, 2]
    for want, have in zip(expected, got):
        for key in ('accuracy', 'density', 'bits_up'):
            assert have[key] == pytest.approx(want[key], abs=1e-6), (want['round'], key)


def test_distributed_auto_without_a_platform_is_one_line(tmp_path):
    job = _main(tmp_path / 'run', 1, '--config.distributed=auto')
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 2, output[-2000:]
    assert "error: config.distributed='auto' found no multi-host platform" in output
    assert 'Traceback' not in output


def test_clients_that_do_not_divide_over_the_devices_use_them_all_with_phantoms(tmp_path):
    """7 clients on 4 devices: 2 per device, one phantom, never sampled or reported; the run, its
    checkpoint (after round 2) and its resume give what one device gives."""
    from spafl_jax import export  # pylint: disable=g-import-not-at-top

    single, multi = tmp_path / 'single', tmp_path / 'multi'
    seven = ('--config.num_clients=7', '--config.eval_every=1')
    for rounds in (2, 3):  # 2 rounds (checkpoint 2), then resumed up to 3
        jobs = [
            _main(single, rounds, *seven, '--config.num_cpu_devices=1'),
            _main(multi, rounds, *seven, '--config.num_cpu_devices=4', '--verbosity=0'),
        ]
        outputs = [_finish(job) for job in jobs]
    assert '7 clients on 4 devices: 2 per device (1 phantom)' in outputs[1], outputs[1][-2000:]
    assert 'resuming after round 2' in outputs[1], outputs[1][-2000:]
    expected, got = _metrics(single), _metrics(multi)
    assert [r['round'] for r in got] == [1, 2, 3]
    for want, have in zip(expected, got):
        assert have['evaluated_clients'] == 7
        for key in ('accuracy', 'density', 'density_weighted', 'bits_up'):
            assert have[key] == pytest.approx(want[key], abs=1e-6), (want['round'], key)
    # What is saved holds the 7 clients only.
    _, clients = export.load_client_variables(str(multi))
    assert len(clients) == 7


def test_the_default_job_gives_the_same_bits_on_one_three_and_four_devices(tmp_path):
    """The README's default job (10 rounds): the threshold mean and every reported sum add the
    sampled clients in client-id order, and each client's steps compile to the same arithmetic
    on any mesh, so the records and the final state are byte-identical, not merely close."""
    workdirs = {n: tmp_path / f'd{n}' for n in (1, 3, 4)}
    env = dict(os.environ)
    env.pop('XLA_FLAGS', None)
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                _MAIN,
                f'--workdir={workdir}',
                '--config.rounds=10',
                f'--config.num_cpu_devices={n}',
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n, workdir in workdirs.items()
    ]
    for job in jobs:
        _finish(job)
    read = lambda n, name: (workdirs[n] / name).read_bytes()
    assert len(read(1, 'metrics.jsonl').splitlines()) == 10
    for n in (3, 4):
        assert read(n, 'metrics.jsonl') == read(1, 'metrics.jsonl'), n
        assert read(n, 'final_state.msgpack') == read(1, 'final_state.msgpack'), n
