"""The replay engine of the golden traces: our library run on a recording of the official code.

`Replay` feeds what `research/official/record_official.py` recorded from the official SpaFL PyTorch
code (the initial weights, the data split, the sampled clients, the exact order of every local
batch) through `client.local_step`, `server.aggregate`, `server.importance_update` and our
evaluation, one official call at a time. Two users:

- `tests/test_reference.py` (a product test) replays the golden traces beside this file in float64
  and asserts every recorded number after every round;
- `research/official/replay_curve.py` replays the draws of a whole official learning curve in
  float32 (docs/fidelity.md).

A helper module, not a test module: it defines no tests, and anything may import it (with this
folder on `sys.path`).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from spafl_jax import client as client_lib
from spafl_jax import federated
from spafl_jax import masking
from spafl_jax import models
from spafl_jax import server

HERE = os.path.dirname(os.path.abspath(__file__))  # the golden traces: <name>_trace.npz

# The official folders' semantics, as our library's settings (docs/configs.md, "The official
# folders").
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
        new_kernels = set_leaves(
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


def set_leaves(tree, leaves):
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)
