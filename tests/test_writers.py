"""Metric writers: the always-on JSON lines and TensorBoard (with hyperparameters), and the
optional Weights & Biases and CLU writers behind the same interface (faked here: the adapters'
calls into those libraries are what is tested)."""

import importlib.machinery
import json
import os
import sys
import types

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from spafl_jax import configuration
from spafl_jax import writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from spafl_jax.configs import default  # noqa: E402

HPARAMS = {
    'lr': 0.01,
    'model': 'lenet5',
    'penalty_warmup': True,
    'rounds': 500,
    'sparsity_rounds': (1, 10),
    'baseline': {'fedpm': {'lr': 0.1}},
}


def _events(workdir):
    acc = event_accumulator.EventAccumulator(
        os.path.join(workdir, 'tensorboard'), size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    return acc


def test_json_lines_and_tensorboard_with_hyperparameters(tmp_path):
    out = writers.create(str(tmp_path), '', hparams=HPARAMS)
    out.write_scalars(5, {'accuracy': 0.5, 'density': 0.9})
    out.write_scalars(10, {'accuracy': 0.75, 'density': 0.8})
    out.close()
    with open(tmp_path / 'metrics.jsonl') as f:
        assert [json.loads(line) for line in f] == [
            {'round': 5, 'accuracy': 0.5, 'density': 0.9},
            {'round': 10, 'accuracy': 0.75, 'density': 0.8},
        ]
    acc = _events(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars('accuracy')] == [(5, 0.5), (10, 0.75)]
    content = acc.PluginTagToContent('hparams')
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content['_hparams_/session_start_info']
    ).session_start_info
    assert start.hparams['lr'].number_value == 0.01
    assert start.hparams['model'].string_value == 'lenet5'
    assert start.hparams['penalty_warmup'].bool_value is True
    assert start.hparams['sparsity_rounds'].string_value == '(1, 10)'
    assert start.hparams['baseline.fedpm.lr'].number_value == 0.1
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content['_hparams_/experiment']
    ).experiment
    assert 'accuracy' in [m.name.tag for m in experiment.metric_infos]
    assert len(experiment.hparam_infos) == 6

    # Resumed with the same hyperparameters: the event file is kept as it is.
    before = (tmp_path / 'tensorboard' / 'events.out.tfevents.spafl_jax').read_bytes()
    writers.create(str(tmp_path), '', resume_from_round=11, hparams=HPARAMS).close()
    assert (tmp_path / 'tensorboard' / 'events.out.tfevents.spafl_jax').read_bytes() == before

    # New hyperparameters through the interface: TensorBoard shows them, the scalars stay.
    out = writers.create(str(tmp_path), '', resume_from_round=11, hparams=HPARAMS)
    out.write_hparams({**HPARAMS, 'lr': 0.02})
    out.close()
    acc = _events(tmp_path)
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent('hparams')['_hparams_/session_start_info']
    ).session_start_info
    assert start.hparams['lr'].number_value == 0.02
    assert [e.step for e in acc.Scalars('accuracy')] == [5, 10]


def _fake_module(monkeypatch, name, **attributes):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)
    return module


class _Recorder:
    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        self.config = self

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.append((name, a, k))


def test_weights_and_biases_writer(monkeypatch, tmp_path):
    runs = []
    _fake_module(
        monkeypatch, 'wandb', init=lambda **kwargs: runs.append(_Recorder(**kwargs)) or runs[-1]
    )
    monkeypatch.setenv('WANDB_PROJECT', 'my_project')
    out = writers.create(str(tmp_path / 'run'), 'wandb', hparams=HPARAMS)
    out.write_scalars(5, {'accuracy': 0.5})
    out.write_hparams({'lr': 0.02})
    out.close()
    (run,) = runs
    assert run.kwargs['project'] == 'my_project' and run.kwargs['name'] == 'run'
    assert run.kwargs['config'] == HPARAMS and run.kwargs['resume'] == 'allow'
    assert run.kwargs['dir'] == str(tmp_path / 'run')
    assert run.calls == [
        ('log', ({'accuracy': 0.5},), {'step': 5}),
        ('update', ({'lr': 0.02},), {'allow_val_change': True}),
        ('finish', (), {}),
    ]
    # The same workdir is the same W&B run (a resume continues it); another is another.
    writers.create(str(tmp_path / 'run'), 'wandb', resume_from_round=6).close()
    writers.create(str(tmp_path / 'other'), 'wandb').close()
    assert runs[1].kwargs['id'] == run.kwargs['id'] != runs[2].kwargs['id']
    # The always-on writer wrote too.
    assert (tmp_path / 'run' / 'metrics.jsonl').read_text() == '{"accuracy": 0.5, "round": 5}\n'


def test_clu_writer(monkeypatch, tmp_path):
    made = []

    def create_default_writer(logdir, asynchronous=True):
        made.append(_Recorder(logdir=logdir, asynchronous=asynchronous))
        return made[-1]

    clu = _fake_module(monkeypatch, 'clu')
    clu.metric_writers = _fake_module(
        monkeypatch, 'clu.metric_writers', create_default_writer=create_default_writer
    )
    out = writers.create(str(tmp_path), 'clu', hparams={'lr': 0.01, 'shape': (2, 3)})
    out.write_scalars(3, {'density': 0.7})
    out.close()
    (writer,) = made
    assert writer.kwargs == {'logdir': str(tmp_path / 'clu'), 'asynchronous': False}
    assert writer.calls == [
        ('write_hparams', ({'lr': 0.01, 'shape': '(2, 3)'},), {}),
        ('write_scalars', (3, {'density': 0.7}), {}),
        ('flush', (), {}),
        ('close', (), {}),
    ]


def test_a_writer_that_is_unknown_or_not_installed_is_a_config_error(monkeypatch):
    config = default.get_config()
    config.writers = 'tensorbored'
    with pytest.raises(
        configuration.ConfigError,
        match="unknown writer 'tensorbored'; the optional writers are wandb, clu",
    ):
        configuration.validate(config)
    monkeypatch.setattr(writers.importlib.util, 'find_spec', lambda name: None)  # not installed
    config.writers = 'wandb'
    with pytest.raises(
        configuration.ConfigError,
        match=r'needs the wandb package, which is not installed: pip install '
        r"'spafl_jax\[wandb\]'",
    ):
        configuration.validate(config)


@pytest.mark.slow
def test_the_runner_writes_to_the_optional_writer(monkeypatch, tmp_path):
    from spafl_jax import train  # pylint: disable=import-outside-toplevel

    runs = []
    _fake_module(
        monkeypatch, 'wandb', init=lambda **kwargs: runs.append(_Recorder(**kwargs)) or runs[-1]
    )
    config = default.get_config()
    config.update(
        num_clients=4, clients_per_round=2, rounds=4, eval_every=2, local_epochs=1, writers='wandb'
    )
    summary = train.train_and_evaluate(config, str(tmp_path))
    (run,) = runs
    assert run.kwargs['config']['lr'] == config.lr
    logged = [(k['step'], a[0]['accuracy']) for name, a, k in run.calls if name == 'log']
    assert [step for step, _ in logged] == [2, 4]
    assert logged[-1][1] == summary['accuracy']
    assert run.calls[-1][0] == 'finish'
