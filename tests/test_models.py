"""Tests for spafl_jax.models (and the masked layers they are built from): official sizes, conv
implementations that agree, thresholds that really prune, and the MACs the FLOP count relies on."""

from __future__ import annotations

import functools

import chex
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spafl_jax import hardware, layers, masking, models

# name -> (image shape, classes, masked weights, thresholds). Small images where the count does not
# depend on the image size, to keep the file fast.
MODEL_CASES = {
    # 3x3 1->16 (144), 3x3 16->32 (4,608), dense 4*4*32->64 (32,768), 64->10 (640).
    'digits_cnn': ((8, 8, 1), 10, 38_160, 122),
    'digits_mlp': ((8, 8, 1), 10, 2_368, 42),  # 64->32 (2,048), 32->10 (320)
    'lenet5': ((28, 28, 1), 10, 430_500, 580),
    'conv4': ((32, 32, 3), 10, 804_800, 650),
    'resnet18': ((16, 16, 3), 100, 2_790_240, 2_400),
    'vit': ((32, 32, 3), 10, 1_966_080, 12_288),
}
CONV_MODELS = ('digits_cnn', 'lenet5', 'conv4', 'resnet18')
BATCH = 2


def _fill(path: tuple[str, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
    # Values at the scale `init_variables` gives (PyTorch's default), drawn with NumPy: compiling the
    # real initializer costs seconds per model and these tests are about structure, not init.
    name = path[-1]
    if name in ('scale', 'var'):
        return jnp.ones(leaf.shape, leaf.dtype)
    if name in ('bias', 'mean', 'threshold'):
        return jnp.zeros(leaf.shape, leaf.dtype)
    rng = np.random.default_rng(abs(hash(path)) % 2**32)
    bound = 1.0 / np.sqrt(max(int(np.prod(leaf.shape[:-1])), 1))
    return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), leaf.dtype)


@functools.cache
def _shapes(name: str):
    """`init_variables` traced, not run: the exact pytree with shapes and dtypes."""
    image_shape, num_classes, _, _ = MODEL_CASES[name]
    model = models.create_model(name, num_classes)
    return jax.eval_shape(
        lambda key: models.init_variables(model, key, image_shape), jax.random.key(0)
    )


@functools.cache
def _setup(name: str, conv_impl: str = 'im2col'):
    image_shape, num_classes, _, _ = MODEL_CASES[name]
    model = models.create_model(name, num_classes, conv_impl=conv_impl)
    flat = traverse_util.flatten_dict(_shapes(name))
    variables = traverse_util.unflatten_dict(
        {path: _fill(path, leaf) for path, leaf in flat.items()}
    )
    variables.setdefault(
        'batch_stats', {}
    )  # flattening drops the empty collection of BN-free models
    return model, variables


@functools.partial(jax.jit, static_argnums=0, static_argnames=('train',))
def _apply(model, variables, x, train: bool = False):
    """Logits, every module's output and the sown MACs, from one compiled forward pass.

    One compilation per model serves every test: op-by-op dispatch or a compile per test would
    dominate the test time.
    """
    mutable = ('intermediates', 'macs') + (('batch_stats',) if train else ())
    logits, state = model.apply(
        variables, x, train=train, mutable=mutable, capture_intermediates=True
    )
    flat = traverse_util.flatten_dict(state['intermediates'])
    outputs = {
        '/'.join(path[:-1]): value[0] for path, value in flat.items() if path[-1] == '__call__'
    }
    flat = traverse_util.flatten_dict(state['macs'])
    macs = {'/'.join(path[:-1]): value[0] for path, value in flat.items()}
    return logits, outputs, macs, state.get('batch_stats')


def _images(name: str, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (BATCH, *MODEL_CASES[name][0]), jnp.float32)


def _with_thresholds(variables, thresholds):
    return {**variables, 'thresholds': thresholds}


def _median_thresholds(variables):
    # Prunes about half of every layer's rows, so comparisons also exercise the mask.
    kernels = masking.kernels_of(variables['params'], variables['thresholds'])
    return jax.tree.map(
        lambda k: jnp.full(k.shape[-1:], jnp.median(masking.row_magnitude(k))), kernels
    )


@pytest.mark.parametrize('name', list(MODEL_CASES))
def test_masked_weight_and_threshold_counts(name):
    _, _, masked, n_thresholds = MODEL_CASES[name]
    shapes = _shapes(name)
    kernels = masking.kernels_of(shapes['params'], shapes['thresholds'])
    assert sum(int(np.prod(k.shape)) for k in jax.tree.leaves(kernels)) == masked
    assert sum(int(np.prod(t.shape)) for t in jax.tree.leaves(shapes['thresholds'])) == n_thresholds
    for k, t in zip(jax.tree.leaves(kernels), jax.tree.leaves(shapes['thresholds'])):
        assert t.shape == k.shape[-1:]  # one threshold per output row


def test_init_variables_lenet5():
    model = models.create_model('lenet5', 10)
    variables = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    assert set(variables) == {'params', 'thresholds', 'batch_stats'}
    chex.assert_trees_all_equal_shapes(variables, _setup('lenet5')[1])
    for t in jax.tree.leaves(variables['thresholds']):
        assert not np.any(np.asarray(t))  # thresholds start at 0
    kernel = variables['params']['fc1']['kernel']  # PyTorch default: U(+-1/sqrt(800))
    assert float(jnp.max(jnp.abs(kernel))) <= 1 / np.sqrt(800)
    assert float(jnp.max(jnp.abs(kernel))) > 0.9 / np.sqrt(800)


def test_unmasked_layers_are_the_ones_the_spec_names():
    # ResNet: every conv masked, head not; ViT: only qkv / attn_out / mlp1 / mlp2 of each block.
    _, resnet = _setup('resnet18')
    names = masking.layer_names(resnet['thresholds'])
    assert 'stem' in names and all('head' not in n for n in names)
    assert sum(n.endswith('shortcut') for n in names) == 3
    _, vit = _setup('vit')
    names = masking.layer_names(vit['thresholds'])
    assert sorted({n.split('/')[-1] for n in names}) == ['attn_out', 'mlp1', 'mlp2', 'qkv']
    assert len(names) == 4 * 6
    assert {'patch_embedding', 'cls_token', 'pos_embedding', 'head', 'norm'} <= set(vit['params'])


@pytest.mark.parametrize('name', list(MODEL_CASES))
def test_output_shapes(name):
    model, variables = _setup(name)
    num_classes = MODEL_CASES[name][1]
    logits, _, _, _ = _apply(model, variables, _images(name))
    chex.assert_shape(logits, (BATCH, num_classes))
    chex.assert_tree_all_finite(logits)
    # Training mode, traced only (a second compilation would double the cost of this file).
    logits, _, _, batch_stats = jax.eval_shape(
        functools.partial(_apply, model, train=True), variables, _images(name)
    )
    chex.assert_shape(logits, (BATCH, num_classes))
    if variables['batch_stats']:
        chex.assert_trees_all_equal_shapes(batch_stats, variables['batch_stats'])


@pytest.mark.parametrize('name', CONV_MODELS)
def test_im2col_and_xla_convs_agree(name):
    model, variables = _setup(name, 'im2col')
    xla_model, _ = _setup(name, 'xla')
    variables = _with_thresholds(variables, _median_thresholds(variables))
    x = _images(name)
    chex.assert_trees_all_close(
        _apply(model, variables, x)[0], _apply(xla_model, variables, x)[0], rtol=1e-4, atol=1e-5
    )


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _conv(conv_impl, x, kernel, strides, padding):
    return layers.CONV_IMPLS[conv_impl](x, kernel, strides=strides, padding=padding)


@pytest.mark.parametrize(
    'kernel_size,strides,padding',
    [
        ((3, 3), (2, 2), 1),
        ((3, 3), (2, 2), ((1, 1), (1, 1))),
        ((1, 1), (2, 2), 0),
        ((3, 3), (1, 1), 1),
        ((5, 5), (2, 2), ((2, 1), (0, 2))),
        ((3, 3), (2, 2), 'SAME'),
        ((5, 5), (1, 1), 'VALID'),
    ],
)
def test_conv_impls_agree_on_padding(kernel_size, strides, padding):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, 8, 8, 3)).astype(np.float32)
    kernel = rng.normal(size=(*kernel_size, 3, 4)).astype(np.float32)
    chex.assert_trees_all_close(
        _conv('im2col', x, kernel, strides, padding),
        _conv('xla', x, kernel, strides, padding),
        rtol=1e-5,
        atol=1e-5,
    )


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _conv_cnhw(conv_impl, x, kernel, strides, padding):
    # NHWC in and out, computed in the CNHW layout.
    y = layers.CONV_IMPLS[conv_impl](
        x.transpose(3, 0, 1, 2), kernel, strides=strides, padding=padding, layout='CNHW'
    )
    return y.transpose(1, 2, 3, 0)


@pytest.mark.parametrize(
    'kernel_size,strides,padding',
    [
        ((3, 3), (2, 2), 1),
        ((5, 5), (2, 2), ((2, 1), (0, 2))),
        ((3, 3), (2, 2), 'SAME'),
        ((5, 5), (1, 1), 'VALID'),
        ((1, 1), (2, 2), 0),
    ],
)
@pytest.mark.parametrize('conv_impl', list(layers.CONV_IMPLS))
def test_cnhw_layout_computes_the_nhwc_convolution(conv_impl, kernel_size, strides, padding):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, 9, 8, 3)).astype(np.float32)
    kernel = rng.normal(size=(*kernel_size, 3, 4)).astype(np.float32)
    chex.assert_trees_all_close(
        _conv_cnhw(conv_impl, x, kernel, strides, padding),
        _conv('xla', x, kernel, strides, padding),
        rtol=1e-5,
        atol=1e-5,
    )


def test_max_pool_2x2_in_both_layouts_is_flax_max_pool():
    x = np.random.default_rng(2).normal(size=(BATCH, 7, 6, 3)).astype(np.float32)  # odd row dropped
    want = nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(models.max_pool_2x2(x), want)
    np.testing.assert_array_equal(
        models.max_pool_2x2(x.transpose(3, 0, 1, 2), 'CNHW').transpose(1, 2, 3, 0), want
    )


@pytest.mark.parametrize('name', ('digits_cnn', 'lenet5', 'conv4'))
def test_layouts_give_the_same_model(name):
    """Same parameters, logits and gradients in NHWC and CNHW: the layout is only how it runs."""
    image_shape, num_classes, _, _ = MODEL_CASES[name]
    _, variables = _setup(name)
    variables = _with_thresholds(variables, _median_thresholds(variables))
    x = _images(name)
    results = []
    for layout in layers.LAYOUTS:
        model = models.MODELS[name](num_classes=num_classes, layout=layout)
        chex.assert_trees_all_equal_shapes(
            jax.eval_shape(
                lambda key: models.init_variables(model, key, image_shape), jax.random.key(0)
            ),
            _shapes(name),
        )

        @jax.jit
        def logits_and_grads(params, model=model):
            loss = lambda p: jnp.sum(model.apply({**variables, 'params': p}, x, train=False) ** 2)
            return model.apply({**variables, 'params': params}, x, train=False), jax.grad(loss)(
                params
            )

        results.append(logits_and_grads(variables['params']))
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-4, atol=1e-5)


def test_models_are_plain_and_specialized_for_cpu_at_creation():
    # A model as written is plain Flax: XLA's convolutions in NHWC, XLA's compiler defaults.
    for cls in models.MODELS.values():
        model = cls()
        assert (model.conv_impl, model.layout, model.xla_cpu_ynnpack) == ('xla', 'NHWC', True)
        for backend in ('gpu', 'tpu'):
            assert hardware.specialize(model, backend) is model
    # On CPU, the settings measured fastest (BENCHMARKS.md, "Layouts and YNNPACK").
    for name in ('lenet5', 'digits_cnn'):
        model = models.create_model(name, 10, backend='cpu')
        assert (model.conv_impl, model.layout, model.xla_cpu_ynnpack) == ('im2col', 'CNHW', False)
    conv4 = models.create_model('conv4', 10, backend='cpu')
    assert (conv4.conv_impl, conv4.layout, conv4.xla_cpu_ynnpack) == ('im2col', 'NHWC', True)
    assert models.create_model('lenet5', 10, backend='gpu').conv_impl == 'xla'
    assert models.create_model('lenet5', 10, conv_impl='xla', backend='cpu').conv_impl == 'xla'
    with pytest.raises(ValueError, match='conv_impl'):
        models.create_model('lenet5', 10, conv_impl='winograd')
    with pytest.raises(ValueError, match='layout'):
        layers.spatial_axes('NCHW')
    with pytest.raises(ValueError, match='NHWC'):
        models.init_variables(models.ResNet18(layout='CNHW'), jax.random.key(0), (8, 8, 3))


@pytest.mark.parametrize('conv_impl', list(layers.CONV_IMPLS))
def test_explicit_padding_has_pytorch_alignment(conv_impl):
    # A 3x3 kernel that only passes the centre tap: with PyTorch's padding=1 and stride 2, output
    # pixel i is centred on input pixel 2i; TF's 'SAME' on an even input centres it on 2i + 1.
    x = np.random.default_rng(0).normal(size=(BATCH, 8, 8, 2)).astype(np.float32)
    centre = np.zeros((3, 3, 2, 2), np.float32)
    centre[1, 1] = np.eye(2)
    conv = functools.partial(_conv, conv_impl)
    np.testing.assert_array_equal(conv(x, centre, (2, 2), 1), x[:, ::2, ::2])
    np.testing.assert_array_equal(conv(x, centre, (2, 2), 'SAME'), x[:, 1::2, 1::2])
    # The 1x1 stride-2 shortcut (padding 0) samples the same pixels as the 3x3 path.
    np.testing.assert_array_equal(
        conv(x, np.eye(2, dtype=np.float32)[None, None], (2, 2), 0), x[:, ::2, ::2]
    )


def test_masked_dense_on_tokens_matches_per_token_dense():
    dense = layers.MaskedDense(6)
    x = jax.random.normal(jax.random.key(0), (BATCH, 5, 4))
    variables = dense.init(jax.random.key(1), x)
    variables = {'params': variables['params'], 'thresholds': {'threshold': jnp.full((6,), 0.3)}}
    y, sown = dense.apply(variables, x, mutable=['macs'])
    chex.assert_shape(y, (BATCH, 5, 6))
    flat = dense.apply(variables, x.reshape(-1, 4))
    chex.assert_trees_all_close(y.reshape(-1, 6), flat, rtol=1e-6)
    assert sown['macs']['macs'] == (5 * 4 * 6,)


def _masked_outputs(model, variables, x):
    """Output of every masked layer, keyed like `masking.layer_names`."""
    _, outputs, _, _ = _apply(model, variables, x)
    return {n: outputs[n] for n in masking.layer_names(variables['thresholds'])}


# A masked layer in the middle of each model, with at least one masked layer computed before it.
MIDDLE_LAYER = {
    'digits_cnn': 'conv2',
    'digits_mlp': 'fc2',
    'lenet5': 'fc1',
    'conv4': 'conv3',
    'resnet18': 'stage2_block1/conv2',
    'vit': 'block3/mlp1',
}


@pytest.mark.parametrize('name', list(MODEL_CASES))
def test_thresholds_above_every_row_magnitude_zero_the_layer(name):
    model, variables = _setup(name)
    x = _images(name)
    names = masking.layer_names(variables['thresholds'])
    baseline = _masked_outputs(model, variables, x)

    # One layer: its output becomes exactly 0, and the masked layers upstream are untouched.
    layer = MIDDLE_LAYER[name]
    flat = traverse_util.flatten_dict(variables['thresholds'])
    path = tuple(layer.split('/')) + ('threshold',)
    one_high = traverse_util.unflatten_dict({**flat, path: jnp.full_like(flat[path], 1e3)})
    outputs = _masked_outputs(model, _with_thresholds(variables, one_high), x)
    assert np.any(np.asarray(baseline[layer]))
    assert not np.any(np.asarray(outputs[layer]))
    assert any(
        np.any(np.asarray(outputs[n])) and np.array_equal(outputs[n], baseline[n]) for n in names
    )

    # Every layer: every masked output is exactly 0.
    high = jax.tree.map(lambda t: jnp.full_like(t, 1e3), variables['thresholds'])
    outputs = _masked_outputs(model, _with_thresholds(variables, high), x)
    for n in names:
        assert not np.any(np.asarray(outputs[n])), n
    logits, _, _, _ = _apply(model, _with_thresholds(variables, high), x)
    if name in (
        'digits_cnn',
        'digits_mlp',
        'lenet5',
    ):  # every layer masked and bias-free: the logits vanish
        assert not np.any(np.asarray(logits))
    if name == 'resnet18':  # zero features through fresh BatchNorm: only the head's bias is left
        np.testing.assert_array_equal(
            logits, jnp.broadcast_to(variables['params']['head']['bias'], logits.shape)
        )


def _macs(name):
    model, variables = _setup(name)
    _, _, macs, _ = _apply(model, variables, _images(name))
    return {layer: float(value) for layer, value in macs.items()}


def test_macs_lenet5():
    macs = _macs('lenet5')
    assert macs == {
        'conv1': 24 * 24 * 5 * 5 * 1 * 20,  # 288,000
        'conv2': 8 * 8 * 5 * 5 * 20 * 50,  # 1,600,000
        'fc1': 800 * 500,
        'fc2': 500 * 10,
    }


def test_macs_resnet18_strided_layers():
    macs = _macs('resnet18')  # 16x16 images: stages at 16, 8, 4, 2 pixels
    assert len(macs) == 1 + 16 + 3  # stem, block convs, shortcuts
    assert macs['stem'] == 16 * 16 * 9 * 3 * 32
    assert macs['stage1_block1/conv1'] == 16 * 16 * 9 * 32 * 32
    assert macs['stage2_block1/conv1'] == 8 * 8 * 9 * 32 * 64
    assert macs['stage2_block1/shortcut'] == 8 * 8 * 32 * 64
    assert macs['stage4_block2/conv2'] == 2 * 2 * 9 * 256 * 256


def test_macs_vit_count_tokens():
    macs = _macs('vit')
    tokens = (32 // 4) ** 2 + 1  # 64 patches and the cls token
    assert len(macs) == 24
    assert macs['block1/qkv'] == tokens * 128 * 1536  # 12,779,520
    assert macs['block1/attn_out'] == tokens * 512 * 128
    assert macs['block1/mlp1'] == tokens * 128 * 256
    assert macs['block1/mlp2'] == tokens * 256 * 128
    assert sum(macs.values()) == tokens * 1_966_080


def test_resnet_blocks_have_pytorch_shapes():
    _, variables = _setup('resnet18')
    params = variables['params']
    assert params['stem']['kernel'].shape == (3, 3, 3, 32)
    assert params['stage2_block1']['conv1']['kernel'].shape == (3, 3, 32, 64)
    assert params['stage2_block1']['shortcut']['kernel'].shape == (1, 1, 32, 64)
    assert 'shortcut' not in params['stage1_block1'] and 'shortcut' not in params['stage2_block2']
    assert params['head']['kernel'].shape == (256, 100)
    # Pre-activation: stem BN + two BNs per block, none after the last block.
    assert len(variables['batch_stats']) == 1 + 8


def test_batch_norm_follows_pytorch():
    # Training: normalize with the biased batch variance; running variance updated with the
    # unbiased one (n / (n - 1)), momentum 0.1 in PyTorch's convention; evaluation: running stats.
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, (16, 5)), jnp.float32)
    bn = models.BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)
    y, updated = bn.apply(variables, x, mutable=['batch_stats'])
    mean, var = np.mean(np.asarray(x), 0), np.var(np.asarray(x), 0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(updated['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(updated['batch_stats']['var'], 0.9 + 0.1 * var * 16 / 15, rtol=1e-5)
    evaluated = models.BatchNorm(use_running_average=True).apply(
        {**variables, 'batch_stats': updated['batch_stats']}, x
    )
    stats = updated['batch_stats']
    np.testing.assert_allclose(
        evaluated, (x - stats['mean']) / np.sqrt(stats['var'] + 1e-5), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize('name', ['digits_cnn', 'lenet5', 'conv4'])
def test_sequential_models_are_their_declared_layers(name):
    # One declaration serves the forward pass, the compact export and HeteroFL's slicing: the
    # parameters are exactly the declared layers, and the masked ones' tree order is network order.
    model = models.create_model(name, 10)
    shape = {'conv4': (32, 32, 3), 'lenet5': (28, 28, 1), 'digits_cnn': (8, 8, 1)}[name]
    variables = models.init_variables(model, jax.random.key(0), shape)
    declared = [op[1] for op in model.LAYERS if op[0] in ('conv', 'dense', 'batch_norm')]
    assert sorted(variables['params']) == sorted(declared)
    masked = [op[1] for op in model.LAYERS if op[0] in ('conv', 'dense')]
    assert list(variables['thresholds']) == masked
    assert jax.tree_util.tree_structure(variables['thresholds']) == jax.tree_util.tree_structure(
        {name: {'threshold': 0} for name in masked}
    )
    assert model.export_plan() == ('sequential', model.LAYERS)
