"""Tests of the baselines: each learns on real digits, and the communication counts are hand-checked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from spafl_jax import algorithm as algorithm_lib
from spafl_jax import baselines
from spafl_jax import federated
from spafl_jax import layers
from spafl_jax import masking
from spafl_jax import models
from spafl_jax import server
from spafl_jax.baselines import _common, fedavg, fedpm, fedspa, heterofl, local
from spafl_jax.client import DataSpec, LocalConfig
from spafl_jax.federated import RoundConfig

NUM_CLIENTS = 10
SAMPLED = 5
ROUNDS = 10
IMAGE_SHAPE = (8, 8, 1)
LOCAL_CFG = LocalConfig(batch_size=16, local_epochs=2, lr=0.05)
ROUND_CFG = RoundConfig(clients_per_round=SAMPLED)

# digits_cnn: conv 3x3 1->16, conv 3x3 16->32, dense 512->64, dense 64->10; no bias, no BatchNorm.
KERNEL_SIZES = (3 * 3 * 1 * 16, 3 * 3 * 16 * 32, 512 * 64, 64 * 10)  # 144, 4608, 32768, 640
NUM_PARAMS = sum(KERNEL_SIZES)  # 38160

# Mean client accuracy after ROUNDS rounds, observed with these settings and seeds: FedAvg 0.987,
# Local 0.816, FedPM 0.916, HeteroFL 0.949, FedSpa 0.880 (chance: 0.1). The bounds leave a margin.
MIN_ACCURACY = {'fedavg': 0.85, 'local': 0.65, 'fedpm': 0.75, 'heterofl': 0.8, 'fedspa': 0.7}


@pytest.fixture(scope='module')
def digits():
    """The 1797 scikit-learn digits, 75/25 train/test, dealt round-robin to 10 clients (IID)."""
    raw = load_digits()
    images = raw.images.astype(np.uint8)[..., None]  # 0..16
    labels = raw.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))
    train_ids, test_ids = order[:1347], order[1347:]
    deal = lambda n: [np.arange(k, n, NUM_CLIENTS) for k in range(NUM_CLIENTS)]
    train = federated.make_client_data(images[train_ids], labels[train_ids], deal(len(train_ids)))
    test = federated.make_client_data(images[test_ids], labels[test_ids], deal(len(test_ids)))
    scaled = images[train_ids] / 16.0
    spec = DataSpec(pixel_max=16.0, mean=(float(scaled.mean()),), std=(float(scaled.std()),))
    return train, test, spec


@pytest.fixture(scope='module')
def digits_model():
    model = models.create_model('digits_cnn', 10)
    return model, models.init_variables(model, jax.random.key(0), IMAGE_SHAPE)


@pytest.fixture(scope='module')
def digits_macs(digits_model):
    """Apart from `digits_model`: a forward pass op by op, which only the runs need."""
    return federated.layer_macs(*digits_model, IMAGE_SHAPE)


def _mean_accuracy(result) -> float:
    return float(jnp.mean(result['correct'] / result['counts']))


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(baselines.BASELINES))
def test_baseline_learns_on_digits(name, digits, digits_model, digits_macs):
    train, test, spec = digits
    model, _ = digits_model
    macs = digits_macs
    method, method_cfg = baselines.get(name), baselines.make_config(name)
    state = method.init_state(
        'digits_cnn',
        LOCAL_CFG,
        jax.random.key(1),
        num_clients=NUM_CLIENTS,
        image_shape=IMAGE_SHAPE,
        method_cfg=method_cfg,
    )
    alg = method.algorithm(model, LOCAL_CFG, ROUND_CFG, macs, method_cfg=method_cfg)
    round_fn = algorithm_lib.make_round_fn(
        alg,
        LOCAL_CFG,
        spec,
        aggregation=ROUND_CFG.aggregation,
        client_execution=ROUND_CFG.client_execution,
    )
    eval_fn = algorithm_lib.make_eval_fn(alg, spec, batch_size=64)
    before = _mean_accuracy(eval_fn(state, test))
    seed_key = jax.random.key(2)
    for r in range(ROUNDS):
        sampled = jax.random.choice(
            jax.random.fold_in(jax.random.key(3), r), NUM_CLIENTS, (SAMPLED,), replace=False
        )
        state, metrics = round_fn(state, train, sampled, seed_key)
    result = eval_fn(state, test)
    after = _mean_accuracy(result)

    print(f'{name}: mean client accuracy {before:.3f} -> {after:.3f}')
    assert after >= MIN_ACCURACY[name], (name, before, after)
    assert after > before + 0.3, (name, before, after)
    assert round_fn._cache_size() == 1  # one compilation serves every round
    assert set(metrics) == {'train_loss', 'train_accuracy', 'local_steps', 'flops', 'max_steps'}
    assert float(metrics['flops']) > 0
    assert result['correct'].shape == result['counts'].shape == (NUM_CLIENTS,)
    assert result['layer_density'].shape == (NUM_CLIENTS, len(KERNEL_SIZES))
    assert result['kept_weights'].shape == (NUM_CLIENTS,)
    np.testing.assert_array_equal(result['counts'], test.counts)

    kept = np.asarray(result['kept_weights'])
    if name in ('fedavg', 'local'):
        np.testing.assert_array_equal(kept, NUM_PARAMS)
        np.testing.assert_array_equal(result['layer_density'], 1.0)
    elif name == 'fedspa':
        # Prune-and-regrow keeps exactly half of every layer, for every client, every round.
        np.testing.assert_array_equal(kept, NUM_PARAMS // 2)
        per_layer = [
            np.sum(np.asarray(m), axis=tuple(range(1, m.ndim)))
            for m in jax.tree.leaves(state.clients.masks)
        ]
        np.testing.assert_array_equal(
            np.stack(per_layer, 1), np.tile(np.array(KERNEL_SIZES) // 2, (NUM_CLIENTS, 1))
        )
    elif name == 'heterofl':
        # Widths 1, 1/2, 1/4 by client id mod 3: the kernels of the sub-models (see below).
        np.testing.assert_array_equal(
            kept, [[38160, 9736, 2532][k % 3] for k in range(NUM_CLIENTS)]
        )
    elif name == 'fedpm':
        theta = np.concatenate([np.ravel(p) for p in jax.tree.leaves(state.probabilities)])
        assert theta.min() >= 0.0 and theta.max() <= 1.0
        assert 0.0 < kept[0] < NUM_PARAMS


def test_communication_counts(digits_model):
    _, variables = digits_model
    n, s = NUM_CLIENTS, SAMPLED
    # FedAvg: every parameter, 32 bits, each way, for every sampled client.
    assert fedavg.communication_bits(n, s, variables) == (s * 38160 * 32, s * 38160 * 32)
    # Local: nothing.
    assert local.communication_bits(n, s, variables) == (0, 0)
    # FedPM: one bit per masked weight up, a 32-bit probability per weight down.
    assert fedpm.communication_bits(n, s, variables) == (s * 38160, s * 38160 * 32)
    # HeteroFL sub-models. Width 1/2: conv 3*3*1*8 = 72, conv 3*3*8*16 = 1152, dense (4*4 positions x
    # 16 of 32 channels = 256 inputs) x 32 = 8192, dense 32*10 = 320: 9736. Width 1/4: 36 + 288 +
    # (16*8)*16 + 16*10 = 2532. Clients 0..9 have widths 1, 1/2, 1/4, 1, ...: 4 + 3 + 3 clients.
    assert heterofl.submodel_size(variables, 1.0) == 38160
    assert heterofl.submodel_size(variables, 0.5) == 9736
    assert heterofl.submodel_size(variables, 0.25) == 2532
    exact = 32 * (38160 + 9736 + 2532 + 38160 + 9736)  # clients 0..4
    assert heterofl.communication_bits(n, s, variables, sampled=[0, 1, 2, 3, 4]) == (exact, exact)
    expected = 32 * s * (4 * 38160 + 3 * 9736 + 3 * 2532) / n
    assert heterofl.communication_bits(n, s, variables) == (expected, expected)
    # FedSpa at 50 %: 19080 kept weights (32 bits) + a 38160-bit mask up; the kept weights down.
    assert fedspa.communication_bits(n, s, variables) == (s * (19080 * 32 + 38160), s * 19080 * 32)


def test_heterofl_width_masks_follow_channels(digits_model):
    _, variables = digits_model
    layout = heterofl.width_layout(variables['params'], variables['thresholds'])['params']
    masks = heterofl.width_masks(variables['params'], layout, rate=0.5, xp=np)
    conv0 = masks['conv1']['kernel']  # image channel kept, outputs 0..7
    np.testing.assert_array_equal(conv0[0, 0, 0], np.arange(16) < 8)
    dense0 = masks['fc1']['kernel']  # input f = position * 32 + channel (NHWC flatten)
    np.testing.assert_array_equal(dense0[:, 0], np.arange(512) % 32 < 16)
    np.testing.assert_array_equal(dense0[0], np.arange(64) < 32)
    head = masks['fc2']['kernel']  # every class survives
    np.testing.assert_array_equal(head[:, 0], np.arange(64) < 32)
    assert head[0].all()


def test_fedspa_prune_regrow_by_hand():
    w = jnp.array([0.1, -0.5, 0.3, 0.0, 0.0, 0.0])
    mask = jnp.array([True, True, True, False, False, False])
    grad = jnp.array([0.0, 0.0, 0.0, 0.2, 0.9, 0.1])
    # rate 0.34 of 3 kept -> 1 swap: drop |0.1| (the smallest), grow at |0.9| (the largest gradient).
    new = fedspa.prune_regrow(
        {'l': w}, {'l': mask}, {'l': jnp.abs(grad)}, counts={'l': 3}, rate=0.34
    )['l']
    np.testing.assert_array_equal(new, [False, True, True, False, True, False])
    assert (
        float(fedspa.cosine_rate(fedspa.FedSpaConfig(prune_rate=0.5, anneal_rounds=10), 0)) == 0.5
    )
    assert (
        float(fedspa.cosine_rate(fedspa.FedSpaConfig(prune_rate=0.5, anneal_rounds=10), 12)) == 0.0
    )


def test_fedspa_erk_keeps_the_overall_density():
    shapes = [(3, 3, 1, 16), (3, 3, 16, 32), (512, 64), (64, 10)]
    densities = fedspa.layer_densities(shapes, 0.5, 'erk')
    sizes = np.array([np.prod(s) for s in shapes])
    np.testing.assert_allclose(np.dot(densities, sizes), 0.5 * sizes.sum())
    # sum(shape) / prod(shape) is largest for the small first conv and the head: both end up dense.
    assert densities[0] == densities[3] == 1.0
    assert densities[1] < 0.5 and densities[2] < 1.0


def test_fedspa_server_mean_is_over_the_holders(digits_model):
    # Two clients upload their weights on their own masks; the server's new weight of each entry is
    # the weighted mean over the clients that hold it, and an entry nobody holds keeps its value.
    model, _ = digits_model
    alg = fedspa.algorithm(model, LOCAL_CFG)
    state = jax.jit(  # one program, not one per operation and shape
        lambda key: fedspa.init_state(
            'digits_cnn', LOCAL_CFG, key, num_clients=2, image_shape=IMAGE_SHAPE
        )
    )(jax.random.key(0))

    @jax.jit
    def upload_and_mean(state):
        # Each client's random mask, with the first slice of every kernel held by nobody.
        masks = [
            jax.tree.map(lambda m: m[k].at[0].set(False), state.clients.masks) for k in range(2)
        ]
        works = [
            fedspa.FedSpaWork(
                params=fedspa._on_mask(
                    jax.tree.map(lambda p: jnp.full(p.shape, value), state.global_params),
                    state.thresholds,
                    m,
                ),
                batch_stats=state.clients.batch_stats,
                masks=m,
                next_masks=m,
            )
            for value, m in ((1.0, masks[0]), (5.0, masks[1]))
        ]
        _, messages = jax.vmap(alg.client_end)(
            jax.tree.map(lambda *xs: jnp.stack(xs), *works), jnp.zeros(2)
        )
        mean = server.aggregate(messages, jnp.array([1.0, 3.0]))
        return masks, alg.server_update(state, mean, state.clients).global_params

    masks, new = upload_and_mean(state)

    kernels = jax.tree.leaves(masking.kernels_of(new, state.thresholds))
    old = jax.tree.leaves(masking.kernels_of(state.global_params, state.thresholds))
    held = [[np.asarray(m) for m in jax.tree.leaves(mask)] for mask in masks]
    assert len(kernels) == len(KERNEL_SIZES)
    for kernel, before, h0, h1 in zip(kernels, old, *held):
        assert (h0 & h1).any() and (h0 & ~h1).any() and (~h0 & h1).any()
        expected = np.where(
            h0 & h1, (1.0 * 1.0 + 3.0 * 5.0) / 4.0, np.where(h0, 1.0, np.where(h1, 5.0, before))
        )
        np.testing.assert_allclose(kernel, expected, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(kernel)[0], np.asarray(before)[0])


def test_dense_thresholds_give_the_plain_dense_gradient():
    # Even for a model built with the `identity` estimator, which would leak a gradient through the
    # row magnitudes, the dense baselines' kernel gradient is exactly the dense one.
    layer = _common.dense_model(layers.MaskedDense(3, estimator='identity'))
    x = jnp.array([[1.0, -2.0], [0.5, 4.0]])
    variables = jax.jit(layer.init)(jax.random.key(0), x)
    thresholds = _common.dense_thresholds(variables['thresholds'])
    grad = jax.jit(
        jax.grad(lambda p: jnp.sum(layer.apply({'params': p, 'thresholds': thresholds}, x)))
    )(variables['params'])['kernel']
    np.testing.assert_array_equal(grad, np.tile(x.sum(0)[:, None], (1, 3)))
