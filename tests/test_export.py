"""Tests for spafl_jax.export: the compact model computes what the masked model's evaluation computes,
has exactly the kept rows' parameters, refuses a constant model clearly, and survives a trip through
.npz/.json into a numpy-only forward."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

from flax import serialization
from flax import traverse_util
import jax
import numpy as np
import pytest

from spafl_jax import export, models

# Small images where the model allows it, and narrower/shallower variants of the big models, to keep
# the file fast (the export walks each model's own `export_plan()`: its stages, blocks and depth).
IMAGE_SHAPES = {
    'digits_cnn': (8, 8, 1),
    'lenet5': (28, 28, 1),
    'conv4': (32, 32, 3),
    'resnet18': (16, 16, 3),
    'vit': (16, 16, 3),
}
MODEL_KWARGS = {'resnet18': {'widths': (8, 16)}, 'vit': {'depth': 1}}
MODEL_NAMES = [name for name in IMAGE_SHAPES if name in models.MODELS]
PRUNED_FRACTION = 0.4


@functools.cache
def _model(name: str):
    """The module and its variable shapes (eval_shape: compiling a real init takes far longer)."""
    model = models.MODELS[name](num_classes=10, **MODEL_KWARGS.get(name, {}))
    shapes = jax.eval_shape(
        lambda key: models.init_variables(model, key, IMAGE_SHAPES[name]), jax.random.key(0)
    )
    return model, shapes


def _sparse_variables(name: str, seed: int = 0):
    """Random variables with a known row pattern: in every masked layer 40 % of the rows (at least
    one) are pruned by a threshold just above their magnitude, the rest kept by one just below.
    BatchNorm statistics and affine parameters are random, so pruned rows become non-zero constants.
    Returns (variables, {layer: kept-row mask})."""
    _, shapes = _model(name)
    rng = np.random.default_rng(seed)

    def value(path, shape):
        if path[-1] == 'kernel':  # PyTorch's default scale, 1/sqrt(fan_in)
            bound = 1.0 / np.sqrt(np.prod(shape.shape[:-1]))
            return rng.uniform(-bound, bound, shape.shape).astype(np.float32)
        if path[-1] == 'var':
            return rng.uniform(0.5, 2.0, shape.shape).astype(np.float32)
        return rng.normal(size=shape.shape).astype(np.float32)

    params = {k: value(k, v) for k, v in traverse_util.flatten_dict(shapes['params']).items()}
    stats = {k: value(k, v) for k, v in traverse_util.flatten_dict(shapes['batch_stats']).items()}
    params = traverse_util.unflatten_dict(params)
    masks, thresholds = {}, {}
    for path, _ in traverse_util.flatten_dict(shapes['thresholds']).items():
        kernel = traverse_util.flatten_dict(params)[path[:-1] + ('kernel',)]
        magnitude = np.abs(kernel).mean(axis=tuple(range(kernel.ndim - 1)))
        rows = magnitude.shape[0]
        pruned = np.zeros(rows, bool)
        pruned[rng.permutation(rows)[: max(1, int(PRUNED_FRACTION * rows))]] = True
        masks['/'.join(path[:-1])] = ~pruned
        thresholds[path] = np.where(pruned, magnitude * 1.01, magnitude * 0.99).astype(np.float32)
    variables = {
        'params': params,
        'thresholds': traverse_util.unflatten_dict(thresholds),
        'batch_stats': traverse_util.unflatten_dict(stats) if stats else {},
    }
    return variables, masks


def _images(name: str, batch: int = 3, seed: int = 1) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed), (batch, *IMAGE_SHAPES[name])))


def _masked_eval(name: str, variables, x):
    model, _ = _model(name)
    return np.asarray(model.apply(export.eval_variables(variables), x, train=False))


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_compact_equals_masked_eval(name):
    variables, _ = _sparse_variables(name)
    compact = export.compact_model(_model(name)[0], variables)
    x = _images(name)
    expected = _masked_eval(name, variables, x)
    np.testing.assert_allclose(
        export.compact_apply(compact.description, compact.params, x), expected, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        export.numpy_apply(compact.description, compact.params, x), expected, rtol=1e-5, atol=1e-5
    )
    assert compact.num_parameters < export.count_parameters(variables)


def _all_layers(layers):
    for layer in layers:
        yield layer
        for key in ('pre', 'body', 'shortcut'):
            yield from _all_layers(layer.get(key) or [])


def test_constants_of_pruned_rows_are_folded():
    """Conv4's pruned rows reach the next layer as BN constants (a bias); the ResNet's reach a padded
    conv (a const_kernel): both paths must actually be exercised by the equality test above."""
    conv4 = export.compact_model('conv4', _sparse_variables('conv4')[0])
    folded = [l['name'] for l in conv4.description['layers'] if l.get('bias')]
    assert folded == ['conv2', 'conv3', 'conv4', 'fc1', 'fc2', 'fc3']
    if 'resnet18' in MODEL_NAMES:
        resnet = export.compact_model(_model('resnet18')[0], _sparse_variables('resnet18')[0])
        assert any(l.get('const_kernel') for l in _all_layers(resnet.description['layers']))


def test_parameter_count_is_kept_rows():
    # LeNet-5: no BatchNorm, so pruned rows are 0 after ReLU and nothing is folded.
    _, m = _sparse_variables('lenet5')
    k = {name: int(mask.sum()) for name, mask in m.items()}
    expected = (
        25 * 1 * k['conv1']
        + 25 * k['conv1'] * k['conv2']
        + 16 * k['conv2'] * k['fc1']  # 4x4 map after two pools
        + k['fc1'] * k['fc2']
    )
    assert k == {'conv1': 12, 'conv2': 30, 'fc1': 300, 'fc2': 6}
    assert export.compact_model('lenet5', _sparse_variables('lenet5')[0]).num_parameters == expected

    # Conv4: every layer after the first gets a bias (folded BN constants), every BN 4 kept entries.
    _, m = _sparse_variables('conv4')
    c = [int(m[f'conv{i + 1}'].sum()) for i in range(4)]
    d = [int(m[f'fc{i + 1}'].sum()) for i in range(3)]
    weights = (
        25 * 3 * c[0]
        + 25 * c[0] * c[1]
        + 25 * c[1] * c[2]
        + 25 * c[2] * c[3]
        + 4 * c[3] * d[0]
        + d[0] * d[1]
        + d[1] * d[2]
    )  # 2x2 map before the flatten
    biases = c[1] + c[2] + c[3] + d[0] + d[1] + d[2]
    batch_norm = 4 * (sum(c) + d[0] + d[1])
    compact = export.compact_model('conv4', _sparse_variables('conv4')[0])
    assert compact.num_parameters == weights + biases + batch_norm
    assert compact.params['conv2/kernel'].shape == (5, 5, c[0], c[1])
    assert compact.params['fc1/kernel'].shape == (4 * c[3], d[0])


def test_all_rows_pruned_is_a_clear_error():
    variables, _ = _sparse_variables('lenet5')
    params = traverse_util.flatten_dict(variables['params'])
    # Thresholds alone cannot do it: the collapse reset brings such a layer back. A zero kernel can.
    params[('fc1', 'kernel')] = np.zeros_like(params[('fc1', 'kernel')])
    variables = {**variables, 'params': traverse_util.unflatten_dict(params)}
    with pytest.raises(
        ValueError,
        match=r"all 500 rows of masked layer 'fc1' are pruned.*"
        r'constant',
    ):
        export.compact_model('lenet5', variables)


def test_collapsed_layer_is_reset_as_in_evaluation():
    variables, _ = _sparse_variables('conv4')
    thresholds = dict(variables['thresholds'])
    thresholds['fc1'] = {'threshold': np.full((128,), 1e3, np.float32)}  # 0 % kept
    variables = {**variables, 'thresholds': thresholds}
    compact = export.compact_model('conv4', variables)
    assert compact.params['fc1/kernel'].shape[-1] == 128  # reset: every row is back
    x = _images('conv4')
    np.testing.assert_allclose(
        export.compact_apply(compact.description, compact.params, x),
        _masked_eval('conv4', variables, x),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.slow
def test_npz_json_round_trip_and_standalone_numpy_forward(tmp_path):
    variables, _ = _sparse_variables('conv4')
    compact = export.compact_model('conv4', variables)
    prefix = str(tmp_path / 'client_000')
    written = export.save_compact(prefix, compact.description, compact.params)
    assert written == os.path.getsize(prefix + '.npz') + os.path.getsize(prefix + '.json')
    description, params = export.load_compact(prefix)
    assert description == compact.description
    assert params.keys() == compact.params.keys()
    for key in params:
        np.testing.assert_array_equal(params[key], compact.params[key])

    x = _images('conv4')
    np.save(tmp_path / 'x.npy', x)
    (tmp_path / 'compact_numpy.py').write_text(export.standalone_source())
    # A user without JAX: importing jax (or this package) inside the runner would fail.
    script = (
        "import sys; sys.modules['jax'] = None; sys.modules['spafl_jax'] = None; "
        f'sys.path.insert(0, {str(tmp_path)!r}); import numpy as np, compact_numpy as c; '
        f'd, p = c.load_compact({prefix!r}); '
        "np.save('y.npy', c.numpy_apply(d, p, np.load('x.npy')))"
    )
    subprocess.run([sys.executable, '-c', script], check=True, cwd=tmp_path)
    np.testing.assert_allclose(
        np.load(tmp_path / 'y.npy'), _masked_eval('conv4', variables, x), rtol=1e-5, atol=1e-5
    )


def _write_workdir(workdir, clients):
    """A run's workdir as the runner writes it: config.json and the final client-stacked state."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
        json.dump({'model': 'digits_cnn', 'dataset': 'digits', 'num_clients': len(clients)}, f)
    state = jax.tree.map(lambda *leaves: np.stack(leaves), *clients)
    with open(os.path.join(workdir, export.STATE_FILE), 'wb') as f:
        f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, state)))


@pytest.mark.slow
def test_export_workdir(tmp_path):
    clients = [_sparse_variables('digits_cnn', seed)[0] for seed in range(3)]
    # Client 2 has an all-zero layer: reported, not exported, and the others still are.
    params = traverse_util.flatten_dict(clients[2]['params'])
    params[('conv2', 'kernel')] = np.zeros_like(params[('conv2', 'kernel')])
    clients[2] = {**clients[2], 'params': traverse_util.unflatten_dict(params)}
    workdir = str(tmp_path / 'run')
    _write_workdir(workdir, clients)

    model_name, loaded = export.load_client_variables(workdir)
    assert model_name == 'digits_cnn' and len(loaded) == 3
    np.testing.assert_array_equal(
        loaded[1]['params']['conv1']['kernel'], clients[1]['params']['conv1']['kernel']
    )

    out = str(tmp_path / 'out')
    rows = export.export_workdir(workdir, out, batch_size=8, repeats=2)
    assert [r['client'] for r in rows] == [0, 1, 2]
    assert "'conv2'" in rows[2]['error']
    for r in rows[:2]:
        assert r['params_before'] == 38_160 and 0 < r['params_after'] < 38_160
        assert r['max_abs_diff'] < 1e-5 and r['masked_s'] > 0 and r['compact_s'] > 0
        assert r['bytes'] == sum(
            os.path.getsize(os.path.join(out, f'client_{r["client"]:03d}{e}'))
            for e in ('.npz', '.json')
        )
    assert os.path.exists(os.path.join(out, 'compact_numpy.py'))
    # A chosen subset, and an id the run does not have.
    subset = export.export_workdir(
        workdir, str(tmp_path / 'subset'), batch_size=8, repeats=1, clients=[1]
    )
    assert [r['client'] for r in subset] == [1]
    assert subset[0]['params_after'] == rows[1]['params_after']
    assert sorted(os.listdir(tmp_path / 'subset')) == [
        'client_001.json',
        'client_001.npz',
        'compact_numpy.py',
    ]
    with pytest.raises(ValueError, match=r'clients \[7\] are not in the run; it has clients 0..2'):
        export.export_workdir(workdir, str(tmp_path / 'bad'), clients=[1, 7])
