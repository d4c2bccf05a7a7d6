"""Golden traces of the official PyTorch code, replayed through our library.

Each fixture in tests/reference/ was recorded by `research/official/record_official.py` from the
official SpaFL code itself (docs/fidelity.md, "The golden traces"): the initial weights, the
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

The replay (`tests/reference/replay.py`) feeds the same initial weights, batches and sampled
clients through `client.local_step`, `server.aggregate`, `server.importance_update` and our
evaluation, and asserts that every recorded number agrees after every round, to float32
tolerance. That covers the mask, the estimators, the penalty and its warm-up, momentum
(persistent or fresh), clipping, partial last batches, aggregation, both importance-update
schedules, BatchNorm statistics and the reported density.

A third fixture, `fmnist_collapse_trace.npz`, is the FMNIST trace recorded with th_coeff 0.5, where
layers collapse (at most 1 % of rows kept) and the official code resets their thresholds: it pins
down when that reset happens (`LocalConfig.collapse_check`).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spafl_jax import masking
from spafl_jax import server

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'reference'))

# The replay engine beside the traces (a helper module, shared with research/official/).
from replay import Replay  # pylint: disable=wrong-import-position,import-error
from replay import load_trace  # pylint: disable=wrong-import-position,import-error
from replay import set_leaves  # pylint: disable=wrong-import-position,import-error
from replay import to_official  # pylint: disable=wrong-import-position,import-error

pytestmark = pytest.mark.slow  # end-to-end: deselect with -m 'not slow'

# Measured on the fixtures: thresholds agree to 2e-9, weight fingerprints to 3e-8 of their scale.
# The smallest semantic effect in a trace is far above both: the importance update moves a conv
# weight by delta / 25 (about 1e-6) and a row sum by about 1e-4.
THRESHOLD_ATOL = 1e-7
WEIGHT_RTOL = 1e-6


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
    return set_leaves(replay.server_thresholds, leaves)


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
