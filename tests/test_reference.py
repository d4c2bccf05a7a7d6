"""Golden traces of the official PyTorch code, replayed through our library.

Each fixture in tests/reference/ was recorded by `tests/reference/record_official.py` from the
official SpaFL code itself (README, "The reference: the official code"): the initial weights, the
data split, the sampled clients, the exact order of every local batch, and after each round every
client's thresholds, a fingerprint of its weights (row sums, row mean magnitudes, sampled entries)
after training, after the importance update and after testing, the global thresholds and their
change, and every client's test accuracy and density.

Both codes run in float64 (the recorder casts the official model, and makes its step function's
mask in float64 rather than `.float()`, which would round every threshold gradient to float32; the
replay runs under `jax.enable_x64`): in float32, an activation within rounding of a ReLU kink sends
the two codes apart within a few steps of raw-pixel training. In float64 the FMNIST traces agree to
float64 rounding (thresholds within 4e-15, weights within 4e-13 of their scale, asserted below), and
the CIFAR-10 trace, ten times the learning rate with BatchNorm, within 7e-11 and 4e-8: the
tolerances leave no room for a semantic difference.

The replay feeds the same initial weights, batches and sampled clients through `client.local_step`,
`server.aggregate`, `server.importance_update` and our evaluation, and asserts that every recorded
number agrees after every round, to float32 tolerance. That covers the mask, the estimators, the
penalty and its warm-up, momentum (persistent or fresh), clipping, partial last batches,
aggregation, both importance-update schedules, BatchNorm statistics and the reported density.

A third fixture, `fmnist_collapse_trace.npz`, is the FMNIST trace recorded with th_coeff 0.5, where
layers collapse (at most 1 % of rows kept) and the official code resets their thresholds: it pins
down when that reset happens (`LocalConfig.collapse_check`).
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spafl_jax import client as client_lib
from spafl_jax import federated
from spafl_jax import masking
from spafl_jax import models
from spafl_jax import server

pytestmark = pytest.mark.slow  # end-to-end: deselect with -m 'not slow'

HERE = os.path.join(os.path.dirname(__file__), 'reference')

# Measured on the fixtures: thresholds agree to 2e-9, weight fingerprints to 3e-8 of their scale.
# The smallest semantic effect in a trace is far above both: the importance update moves a conv
# weight by delta / 25 (about 1e-6) and a row sum by about 1e-4.
THRESHOLD_ATOL = 1e-7
WEIGHT_RTOL = 1e-6

# The official folders' semantics, as our library's settings (README, "The official folders").
SEMANTICS = {
    'fmnist': dict(
        model='lenet5',
        estimator='identity',
        importance_update='sampled_before',
        persistent_optimizer=True,
        penalty_warmup=True,
        clip=0.0,
        drop_last=False,
        collapse_check='previous',
        dense_inputs={'fc3': (50, 4, 4)},
    ),
    'cifar10': dict(
        model='conv4',
        estimator='outside_unit',
        importance_update='all_after',
        persistent_optimizer=False,
        penalty_warmup=False,
        drop_last=True,
        collapse_check='previous',
        dense_inputs={'dense1': (128, 2, 2)},
    ),
}


def load_trace(name: str) -> tuple[dict, dict]:
    path = os.path.join(HERE, f'{name}_trace.npz')
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    return json.loads(str(arrays.pop('meta'))), arrays


# ------------------------------------------------------------------------------------------------
# Layouts: PyTorch's [out, in, kh, kw] and [out, in] against our [kh, kw, in, out] and [in, out].
# The first dense layer after the conv stack reads features flattened as (channel, row, column)
# in PyTorch and as (row, column, channel) in our models: the same weights, inputs permuted.


def from_official(weight: np.ndarray, chw=None) -> np.ndarray:
    if weight.ndim == 4:
        return weight.transpose(2, 3, 1, 0)
    if chw is not None:
        c, h, w = chw
        return weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
    return weight.T


def to_official(kernel: np.ndarray, chw=None) -> np.ndarray:
    if kernel.ndim == 4:
        return kernel.transpose(3, 2, 0, 1)
    if chw is not None:
        c, h, w = chw
        return kernel.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w)
    return kernel.T


def initial_weights(shapes, seed):
    """The trace's initial weights, drawn as record_official.initial_weights draws them."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        bound = 1.0 / np.sqrt(np.prod(shape[1:]))
        out.append(rng.uniform(-bound, bound, shape).astype(np.float32))
    return out


class Replay:
    """Our library run on a trace's inputs, one official call at a time."""

    def __init__(
        self,
        name: str | tuple[dict, dict],
        collapse_check: str | None = None,
        dtype=jnp.float64,
        conv_impl: str = 'im2col',
    ):
        """`name` is a fixture's name, or its (meta, arrays); `dtype` float64 for the traces, which
        the recorder ran in float64, or float32 for the official code unchanged (replay_curve.py);
        `conv_impl` how our convolutions are computed (the same numbers up to rounding)."""
        self.meta, self.arrays = load_trace(name) if isinstance(name, str) else name
        self.dtype = dtype
        sem = SEMANTICS[self.meta['folder']]
        s = self.meta['settings']
        self.names = self.meta['layers']
        self.chw = [sem['dense_inputs'].get(n) for n in self.names]
        self.cfg = client_lib.LocalConfig(
            batch_size=s['batch_size'],
            local_epochs=s['local_epoch'],
            lr=s['learning_rate'],
            clip=float(s.get('clip', 0.0)),
            th_coeff=s['th_coeff'],
            penalty_warmup=sem['penalty_warmup'],
            persistent_optimizer=sem['persistent_optimizer'],
            drop_last=sem['drop_last'],
            collapse_check=collapse_check or sem['collapse_check'],
        )
        self.importance = sem['importance_update']
        self.num_clients, self.rounds = s['num_clients'], s['comm_rounds']
        self.model = models.create_model(
            sem['model'], 10, estimator=sem['estimator'], conv_impl=conv_impl
        )
        self.spec = client_lib.DataSpec(normalize=False)
        self.train_x = self._nhwc(self.arrays['train_images'])
        self.train_y = jnp.asarray(self.arrays['train_labels'], jnp.int32)
        self.test_x = self._nhwc(self.arrays['test_images'])
        self.test_y = jnp.asarray(self.arrays['test_labels'], jnp.int32)
        self.train_ids = [self.arrays[f'split/train/{k}'] for k in range(self.num_clients)]
        self.test_ids = [self.arrays[f'split/test/{k}'] for k in range(self.num_clients)]
        self.test_length = max(len(ids) for ids in self.test_ids)  # one shape: one compilation

        variables = jax.tree.map(
            lambda v: jnp.asarray(v, dtype),
            models.init_variables(self.model, jax.random.key(0), tuple(self.train_x.shape[1:])),
        )
        if f'initial/{self.names[0]}/weight' in self.arrays:  # recorded whole (replay_curve.py)
            weights = [self.arrays[f'initial/{n}/weight'] for n in self.names]
        else:
            weights = initial_weights(self.meta['layer_shapes'], self.meta['init_seed'])
        kernels = masking.kernels_of(variables['params'], variables['thresholds'])
        paths = self._paths(kernels)
        new_kernels = _set_leaves(
            kernels,
            [jnp.asarray(from_official(w, chw), dtype) for w, chw in zip(weights, self.chw)],
        )
        assert len(paths) == len(self.names)
        params = masking.replace_kernels(variables['params'], new_kernels)
        opt_state = client_lib.init_opt_state(self.cfg, params, variables['thresholds'])
        one = client_lib.ClientState(
            params=params,
            thresholds=variables['thresholds'],
            batch_stats=variables['batch_stats'],
            opt_state=opt_state,
            collapsed=client_lib.init_collapsed(self.cfg, variables['thresholds']),
        )
        self.clients = [one] * self.num_clients
        # Per client and masked layer: how many forward passes reset a collapsed layer's thresholds
        # (the official `zero_count`), counted in training and test alike.
        self.resets = np.zeros((self.num_clients, len(self.names)), np.int64)
        zeros = jax.tree.map(jnp.zeros_like, variables['thresholds'])
        self.server_thresholds, self.delta = zeros, zeros
        b = self.cfg.batch_size
        self.max_steps = self.cfg.local_epochs * max(
            (len(ids) // b if self.cfg.drop_last else -(-len(ids) // b)) for ids in self.train_ids
        )
        self.local_steps = jax.jit(self._local_steps)
        self.evaluate = jax.jit(
            functools.partial(
                federated.evaluate_client, self.model, self.spec, batch_size=64, cfg=self.cfg
            )
        )
        self.tested = jax.jit(lambda c, n: federated.tested_clients(self.cfg, c, n))
        self.density = jax.jit(functools.partial(federated.tested_density_stats, self.cfg))

    def _nhwc(self, images):
        images = np.asarray(images)
        if images.ndim == 3:  # Fashion-MNIST: [n, 28, 28] raw pixels
            return jnp.asarray(images[..., None], self.dtype)
        return jnp.asarray(images.transpose(0, 2, 3, 1), self.dtype)  # [n, c, h, w]

    @staticmethod
    def _paths(tree):
        return [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]

    # -- one client's local training on the recorded batches ------------------------------------

    def _resetting(self, state):
        """Per masked layer, 1 where the next forward pass resets the layer's thresholds."""
        if self.cfg.collapse_check == 'previous':
            flags = state.collapsed
        else:
            flags = masking.collapsed_layers(state.params, state.thresholds)
        return jnp.stack([f.astype(jnp.int32) for f in jax.tree.leaves(flags)])

    def _local_steps(self, state, opt, images, labels, batches, masks, num_steps, lr, penalty):
        """`client.local_step` on batches[0..num_steps) (padded to one shape: one compilation);
        also returns how many of the steps reset each layer."""

        def body(i, carry):
            state, opt, resets = carry
            ids = batches[i]
            resets = resets + self._resetting(state)
            state, opt, _ = client_lib.local_step(
                self.model,
                self.cfg,
                state,
                opt,
                images[ids],
                labels[ids],
                jnp.bool_(True),
                lr=lr,
                penalty_coeff=penalty,
                example_mask=masks[i],
            )
            return state, opt, resets

        resets = jnp.zeros(len(self.names), jnp.int32)
        return jax.lax.fori_loop(0, num_steps, body, (state, opt, resets))

    def train(self, k: int, order: np.ndarray, round_index: int):
        cfg, b = self.cfg, self.cfg.batch_size
        n = len(self.train_ids[k])
        per_epoch = (n // b) * b if cfg.drop_last else n
        assert len(order) == cfg.local_epochs * per_epoch, (k, len(order), per_epoch)
        batches = np.zeros((self.max_steps, b), np.int32)
        masks = np.zeros((self.max_steps, b), bool)
        steps = 0
        for e in range(cfg.local_epochs):
            epoch = order[e * per_epoch : (e + 1) * per_epoch]
            for start in range(0, per_epoch, b):
                ids = epoch[start : start + b]
                masks[steps, : len(ids)] = True
                batches[steps] = np.pad(ids, (0, b - len(ids)), mode='edge')
                steps += 1
        state = self.clients[k]
        opt = client_lib.round_opt_state(cfg, state)
        lr = client_lib.learning_rate(cfg, round_index)
        penalty = cfg.th_coeff * client_lib.penalty_scale(cfg, round_index)
        state, opt, resets = self.local_steps(
            state, opt, self.train_x, self.train_y, batches, masks, steps, lr, penalty
        )
        self.resets[k] += np.asarray(resets)
        if cfg.persistent_optimizer:
            state = state.replace(opt_state=opt)
        self.clients[k] = state

    def test(self, k: int):
        ids = self.test_ids[k]
        padded = np.pad(ids, (0, self.test_length - len(ids)))
        correct = self.evaluate(
            self.clients[k], self.test_x, self.test_y, jnp.asarray(padded, jnp.int32), len(ids)
        )
        stacked = jax.tree.map(lambda x: x[None], self.clients[k])
        count = jnp.asarray([len(ids)], jnp.int32)
        self.layer_density = np.asarray(self.density(stacked, count)['layer_density'])[0]
        self.resets[k] += np.asarray(self._resetting(self.clients[k]))  # the test's first pass
        self.clients[k] = jax.tree.map(lambda x: x[0], self.tested(stacked, count))
        return 100.0 * float(correct) / len(ids), float(np.mean(self.layer_density))

    def importance_update(self, k: int, delta):
        state = self.clients[k]
        self.clients[k] = state.replace(params=server.importance_update(state.params, delta))


def _set_leaves(tree, leaves):
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


class Checker:
    """Compares our client states with a trace's snapshots and keeps the largest deviations."""

    def __init__(self, replay: Replay):
        self.replay = replay
        self.worst: dict[str, float] = {}

    def _note(self, what, value):
        self.worst[what] = max(self.worst.get(what, 0.0), float(value))

    def snapshot(self, prefix: str, k: int):
        rp, arrays = self.replay, self.replay.arrays
        state = rp.clients[k]
        thresholds = jax.tree.leaves(state.thresholds)
        kernels = jax.tree.leaves(masking.kernels_of(state.params, state.thresholds))
        for name, t, kernel, chw in zip(rp.names, thresholds, kernels, rp.chw):
            np.testing.assert_allclose(
                np.asarray(t),
                arrays[f'{prefix}/threshold/{name}'],
                rtol=0,
                atol=THRESHOLD_ATOL,
                err_msg=f'{prefix} {name} thresholds',
            )
            self._note(
                'threshold', np.max(np.abs(np.asarray(t) - arrays[f'{prefix}/threshold/{name}']))
            )
            w = to_official(np.asarray(kernel, np.float64), chw).reshape(kernel.shape[-1], -1)
            for key, ours in (
                ('row_sum', w.sum(axis=1)),
                ('row_abs_mean', np.abs(w).mean(axis=1)),
                ('entries', w.reshape(-1)[arrays[f'{prefix}/{name}/entry_index']]),
            ):
                theirs = arrays[f'{prefix}/{name}/{key}']
                scale = np.max(np.abs(arrays[f'initial/{name}/{key}'])) + 1e-12
                np.testing.assert_allclose(
                    ours, theirs, rtol=0, atol=WEIGHT_RTOL * scale, err_msg=f'{prefix} {name} {key}'
                )
                self._note(key, np.max(np.abs(ours - theirs)) / scale)
        stats = jax.tree.leaves(state.batch_stats)
        official = sorted(k_ for k_ in arrays if k_.startswith(f'{prefix}/bn/'))
        if official:
            ours = {}
            for path, value in jax.tree_util.tree_flatten_with_path(state.batch_stats)[0]:
                ours[(str(path[0].key), str(path[-1].key))] = np.asarray(value)
            names = sorted({k_.split('/')[-2] for k_ in official})
            for i, bn in enumerate(names):
                for ours_key, theirs_key in (('mean', 'mean'), ('var', 'var')):
                    mine = ours[(f'bn{i + 1}', ours_key)]
                    theirs = arrays[f'{prefix}/bn/{bn}/{theirs_key}']
                    np.testing.assert_allclose(
                        mine,
                        theirs,
                        rtol=WEIGHT_RTOL,
                        atol=WEIGHT_RTOL * np.max(np.abs(theirs)),
                        err_msg=f'{prefix} {bn} running {ours_key}',
                    )
        else:
            assert not stats


def _tree_from_official(replay, prefix):
    def official(name):  # the FMNIST server keys its thresholds 'conv1.threshold', CIFAR 'conv1'
        key = f'{prefix}/{name}'
        return replay.arrays[key if key in replay.arrays else f'{key}.threshold']

    leaves = [jnp.asarray(official(name)) for name in replay.names]
    return _set_leaves(replay.server_thresholds, leaves)


def replay_trace(name: str, collapse_check: str | None = None) -> Checker:
    with jax.enable_x64(True):
        return _replay(name, collapse_check)


def _replay(name: str, collapse_check: str | None) -> Checker:
    rp = Replay(name, collapse_check)
    arrays = rp.arrays
    check = Checker(rp)
    kernels = jax.tree.leaves(masking.kernels_of(rp.clients[0].params, rp.clients[0].thresholds))
    for name, kernel, chw in zip(rp.names, kernels, rp.chw):  # the same initial model
        w = to_official(np.asarray(kernel, np.float64), chw).reshape(kernel.shape[-1], -1)
        np.testing.assert_allclose(
            w.sum(axis=1),
            arrays[f'initial/{name}/row_sum'],
            rtol=1e-6,
            atol=1e-9,
            err_msg=f'initial {name}',
        )
    for r in range(rp.rounds):
        sampled = arrays[f'r{r}/sampled']
        for k in sampled:  # 2. broadcast; FMNIST: the previous round's delta, before training
            rp.clients[k] = rp.clients[k].replace(thresholds=rp.server_thresholds)
            if rp.importance == 'sampled_before' and r > 0:
                rp.importance_update(k, rp.delta)
                check.snapshot(f'r{r}/importance/{k}', k)
        for k in sampled:  # 3. local training on the recorded batches
            rp.train(k, arrays[f'r{r}/order/{k}'], r)
            check.snapshot(f'r{r}/trained/{k}', k)
        # 4-5. aggregation: the unweighted mean of the sampled clients' thresholds
        new_global = server.aggregate(
            jax.tree.map(lambda *t: jnp.stack(t), *[rp.clients[k].thresholds for k in sampled])
        )
        rp.delta = jax.tree.map(jnp.subtract, new_global, rp.server_thresholds)
        rp.server_thresholds = new_global
        for what, tree in (('global', new_global), ('delta', rp.delta)):
            official = _tree_from_official(rp, f'r{r}/{what}')
            for ours, theirs in zip(jax.tree.leaves(tree), jax.tree.leaves(official)):
                np.testing.assert_allclose(
                    ours, theirs, rtol=0, atol=THRESHOLD_ATOL, err_msg=f'round {r} {what}'
                )
        if rp.importance == 'all_after':  # 6. CIFAR-10: every client, after aggregation
            for k in range(rp.num_clients):
                rp.importance_update(k, rp.delta)
                check.snapshot(f'r{r}/importance/{k}', k)
        for k in range(rp.num_clients):  # 7. every client on its own test split
            accuracy, density = rp.test(k)
            prefix = f'r{r}/tested/{k}'
            # Ratios of counts (the official accuracy is summed in float32): one test example or
            # one row is worth far more than the tolerance.
            assert accuracy == pytest.approx(float(arrays[f'{prefix}/accuracy']), abs=1e-4), prefix
            assert density == pytest.approx(float(arrays[f'{prefix}/density']), abs=1e-6), prefix
            check.snapshot(prefix, k)
    return check


def test_fmnist_trace_matches_the_official_code():
    check = replay_trace('fmnist')
    meta, arrays = load_trace('fmnist')
    # The trace is not trivial: thresholds moved, masks pruned rows, and some clients had a
    # partial last batch.
    assert max(np.max(np.abs(arrays[f'r2/global/{n}.threshold'])) for n in meta['layers']) > 1e-3
    assert min(float(arrays[f'r2/tested/{k}/density']) for k in range(6)) < 0.95
    assert any(len(arrays[f'split/train/{k}']) % 64 for k in range(6))
    print('largest deviations', check.worst)
    _assert_float64_rounding(check)


def _assert_float64_rounding(check):
    """Two float64 programs computing the same thing, apart only by how each rounds (measured:
    thresholds 3e-15, weights 3e-13 of their scale; float32 would be about 1e-8)."""
    assert check.worst['threshold'] < 1e-13, check.worst
    assert max(check.worst[k] for k in ('row_sum', 'row_abs_mean', 'entries')) < 1e-11, check.worst


def test_cifar10_trace_matches_the_official_code():
    check = replay_trace('cifar10')
    print('largest deviations', check.worst)


def test_collapse_trace_matches_the_official_code():
    """th_coeff 0.5: layers collapse within the trace, so it fixes when a reset happens."""
    meta, _ = load_trace('fmnist_collapse')
    assert meta['settings']['th_coeff'] == 0.5 and sum(meta['collapse_resets']) >= 2
    check = replay_trace('fmnist_collapse')
    # Every client's layers collapsed and were reset as often as the official ones.
    np.testing.assert_array_equal(check.replay.resets.reshape(-1), meta['collapse_resets'])
    print('largest deviations', check.worst)
    _assert_float64_rounding(check)


def test_collapse_trace_tells_the_reset_timings_apart():
    """Checking the mask about to be used, instead of the previous forward pass's, resets a step
    earlier and leaves the official thresholds behind by far more than the tolerance."""
    with pytest.raises(AssertionError, match='thresholds'):
        replay_trace('fmnist_collapse', collapse_check='current')


def test_replay_curve_reports_layers_and_resets_as_the_official_code(tmp_path):
    """replay_curve.py (float32, as on the official curves' draws) on the collapse trace: every
    client agrees in every round, and the per-layer report counts the resets and kept fractions
    the official code had; a reset the official run had and ours did not is made ours with
    `follow_official_resets`."""
    sys.path.insert(0, HERE)
    import replay_curve  # pylint: disable=import-outside-toplevel,import-error

    meta, arrays = load_trace('fmnist_collapse')
    n, rounds = meta['settings']['num_clients'], meta['settings']['comm_rounds']
    official_resets = np.asarray(meta['collapse_resets']).reshape(n, len(meta['layers']))
    # What a recorder keeping per-layer records draws: the kept fraction of each test's masks
    # (from the trace's snapshots), and each layer's reset count (known after the last round).
    for r in range(rounds):
        for k in range(n):
            prefix = f'r{r}/tested/{k}'
            arrays[f'{prefix}/layer_density'] = np.asarray(
                [
                    np.mean(
                        arrays[f'{prefix}/{name}/row_abs_mean']
                        > arrays[f'{prefix}/threshold/{name}']
                    )
                    for name in meta['layers']
                ]
            )
            if r == rounds - 1:
                arrays[f'{prefix}/resets'] = official_resets[k]
    per_client = str(tmp_path / 'per_client.npz')
    replay_curve.replay(meta, arrays, str(tmp_path), None, per_client=per_client)
    with open(tmp_path / 'metrics.jsonl') as f:
        last = [json.loads(line) for line in f][-1]
    assert sum(last['resets']) >= 2
    assert last['resets'] == last['official_resets'] == official_resets.sum(axis=0).tolist()
    assert last['clients_equal_resets'] == n

    # Every round's counts, as a recorder keeping per-layer records has them (ours agree with the
    # official ones), and one more official reset, of client 5's first layer in the last round,
    # in which it trains, which ours lacks: following the official resets makes exactly that one,
    # before the aggregation, so the server's thresholds move away from the recorded ones.
    with np.load(per_client) as f:
        assert f['resets'].shape == (rounds, n, len(meta['layers']))
        np.testing.assert_array_equal(f['resets'][-1], official_resets)
        every_round = f['resets']
    claimed = official_resets.copy()
    assert 5 in arrays[f'r{rounds - 1}/sampled']
    claimed[5, 0] += 1
    for r in range(rounds):
        for k in range(n):
            arrays[f'r{r}/tested/{k}/resets'] = claimed[k] if r == rounds - 1 else every_round[r, k]
    replay_curve.replay(
        meta, arrays, str(tmp_path), None, per_client=per_client, follow_official_resets=True
    )
    with open(tmp_path / 'metrics.jsonl') as f:
        records = [json.loads(line) for line in f]
    assert [r['round'] for r in records] == list(range(1, rounds + 1))
    for r in records[:-1]:
        assert r['clients_equal_accuracy'] == n and r['accuracy'] == r['official_accuracy'], r
        assert r['server_threshold_difference'] < 1e-6, r
    last = records[-1]
    assert last['server_threshold_difference'] > 1e-4, last
    assert last['official_resets'] == claimed.sum(axis=0).tolist()
    # The reset ours lacked was made; the thresholds it changed may then make others differ at
    # the test, and those are followed too: in the end ours has every official reset.
    assert last['forced_resets'][0] == 1, last
    assert all(
        o + f >= c
        for o, f, c in zip(last['resets'], last['forced_resets'], last['official_resets'])
    ), last
    assert np.mean(last['official_layer_density']) == pytest.approx(
        last['official_density'], abs=1e-5
    )
    with np.load(per_client) as f:
        np.testing.assert_array_equal(f['official_resets'][-1], claimed)
