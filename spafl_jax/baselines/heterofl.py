"""HeteroFL (Diao et al., ICLR 2021): clients train width-scaled slices of one global model.

Client k has a width rate r_k (`rates[k % len(rates)]`, a fixed pattern). Its sub-model keeps, in
every hidden layer, the leading ceil(r * C) of the C channels: a kernel keeps its leading output rows
and the input rows fed by the previous layer's kept channels; the image channels (first layer's
input) and the classes (last layer's output) are never cut. Instead of slicing, the entries outside the
slice are multiplied by 0 in the forward pass, so shapes stay static and ONE compiled round serves all
rates; zeroed entries get zero gradient and stay 0. The server averages every entry over the sampled
clients whose sub-model holds it (entries held by nobody this round keep their value).

Choices and departures from the paper:
  - the width pattern follows the masked layers in network order (the sequential models' `LAYERS`:
    conv1, conv2, ..., fc1, ...), and a dense layer after a flatten (NHWC, channel fastest) keeps
    feature f iff its channel f % C is kept; only the sequential models (digits_cnn, lenet5, conv4)
    are supported;
  - 1-D parameters and statistics (BatchNorm scale/bias/mean/var) are cut with their own size;
  - BatchNorm keeps running statistics, aggregated like the weights over holders, instead of the
    paper's static BatchNorm (statistics recomputed after training); no Scaler module; no masked
    cross-entropy over the client's own labels;
  - each client is evaluated with the global model cut to ITS OWN width, on its own test split
    (the paper reports the global model at each width on the whole test set);
  - layer_density is the kept-row fraction per layer (the core's definition); FLOPs use the kept-weight
    fraction of each layer (about r^2 for hidden layers).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spafl_jax import algorithm as algorithm_lib
from spafl_jax import client as client_lib
from spafl_jax import masking
from spafl_jax.baselines import _common
from spafl_jax.client import LocalConfig
from spafl_jax.federated import RoundConfig
from spafl_jax.metrics import BITS_PER_FLOAT


@dataclasses.dataclass(frozen=True)
class HeteroFLConfig:
    rates: tuple[float, ...] = (1.0, 0.5, 0.25)  # client k gets rates[k % len(rates)]

    def validate(self) -> None:
        if not self.rates or not all(0.0 < r <= 1.0 for r in self.rates):
            raise ValueError(f'rates={self.rates}: every width rate must be in (0, 1].')


@flax.struct.dataclass
class HeteroFLState:
    params: Any  # the global (full-width) model
    batch_stats: Any  # the global BatchNorm statistics ({} without BatchNorm)
    thresholds: Any  # all DENSE_THRESHOLD: the SpaFL row masks are off
    clients: jax.Array  # [num_clients] float32 width rate of each client
    round: jax.Array  # rounds completed (int32 scalar)


@flax.struct.dataclass
class SliceWork:
    """A sampled client's local work: its slice of the global model, and which entries it holds."""

    rate: jax.Array
    params: Any  # the global weights, zero outside the slice
    batch_stats: Any
    param_masks: Any  # 1.0 where the slice holds an entry, else 0.0
    stat_masks: Any


# ----------------------------------------------------------------------------------------------------
# The width pattern. A layout maps every leaf path to the axes it is cut along, as (axis, C) pairs:
# index i along `axis` is kept iff (i % C) < ceil(rate * C).


def _layer_order(thresholds) -> list[tuple]:
    """The masked layers in network order: the order of the thresholds' tree, which is that of the
    sequential models' layer names (`models.SequentialNet.LAYERS`: conv1, conv2, ..., fc1, ...;
    `width_layout` rejects a model whose order does not chain)."""
    paths = [path[:-1] for path in traverse_util.flatten_dict(thresholds)]
    for path in paths:
        if len(path) != 1:
            raise ValueError(
                f'HeteroFL supports sequential models (models.SequentialNet); got the '
                f'nested masked layer {"/".join(path)}.'
            )
    return paths


def width_layout(params, thresholds) -> dict[str, dict]:
    """{'params': {path: ((axis, C), ...)}, 'batch_stats': ...}: how each leaf is cut (static)."""
    order = _layer_order(thresholds)
    flat_params = traverse_util.flatten_dict(params)
    kernel_specs = {}
    previous_out = None
    for i, path in enumerate(order):
        shape = flat_params[path + ('kernel',)].shape
        spec = []
        if i > 0:
            if shape[-2] % previous_out:
                raise ValueError(
                    f'{"/".join(path)} has {shape[-2]} inputs, not a multiple of the '
                    f"previous layer's {previous_out} outputs: not a sequential model."
                )
            spec.append((len(shape) - 2, previous_out))
        if i < len(order) - 1:
            spec.append((len(shape) - 1, shape[-1]))
        kernel_specs[path + ('kernel',)] = tuple(spec)
        previous_out = shape[-1]

    def leaf_spec(path, shape):
        if path in kernel_specs:
            return kernel_specs[path]
        return ((0, shape[0]),) if len(shape) == 1 else ()

    return {'params': {p: leaf_spec(p, x.shape) for p, x in flat_params.items()}}


def _stats_layout(batch_stats) -> dict:
    return {
        p: ((0, x.shape[0]),) if x.ndim == 1 else ()
        for p, x in traverse_util.flatten_dict(batch_stats).items()
    }


def _kept(rate, channels: int, xp):
    # At least one channel; the small epsilon keeps ceil(0.5 * 64) at 32 in float32.
    return xp.maximum(xp.ceil(rate * channels - 1e-4), 1)


def _leaf_mask(shape, spec, rate, xp=jnp):
    mask = xp.ones(shape, bool)
    for axis, channels in spec:
        kept = xp.arange(shape[axis]) % channels < _kept(rate, channels, xp)
        mask = mask & kept.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return mask


def width_masks(tree, layout: dict, *, rate, xp=jnp):
    """Boolean masks shaped like `tree`: the entries a client of width `rate` holds."""
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict(
        {p: _leaf_mask(np.shape(x), layout[p], rate, xp) for p, x in flat.items()}
    )


def client_rates(num_clients: int, method_cfg: HeteroFLConfig) -> np.ndarray:
    return np.array(
        [method_cfg.rates[k % len(method_cfg.rates)] for k in range(num_clients)], np.float32
    )


# ----------------------------------------------------------------------------------------------------


def init_state(
    model_or_name: nn.Module | str,
    local_cfg: LocalConfig,
    rng: jax.Array,
    *,
    num_clients: int,
    image_shape,
    num_classes: int = 10,
    method_cfg: HeteroFLConfig = HeteroFLConfig(),
) -> HeteroFLState:
    """A fresh full-width global model from `rng`, and the fixed width of every client."""
    del local_cfg
    method_cfg.validate()
    model = _common.dense_model(_common.resolve_model(model_or_name, num_classes))
    variables = _common.init_dense_variables(model, rng, image_shape)
    width_layout(variables['params'], variables['thresholds'])  # fail early on unsupported models
    return HeteroFLState(
        params=variables['params'],
        batch_stats=variables['batch_stats'],
        thresholds=variables['thresholds'],
        clients=jnp.asarray(client_rates(num_clients, method_cfg)),
        round=jnp.zeros((), jnp.int32),
    )


def _kernel_fractions(param_masks, thresholds):
    kernels = masking.kernels_of(param_masks, thresholds)
    return jax.tree.map(lambda m: jnp.mean(m.astype(jnp.float32)), kernels)


# ----------------------------------------------------------------------------------------------------
# One round, as the functions of `algorithm.Algorithm` (the settings they need come first, bound by
# `algorithm`).


def _as_float(tree):
    return jax.tree.map(lambda m: m.astype(jnp.float32), tree)


def slice_of(state, rate) -> SliceWork:
    """The global model cut to width `rate` (entries outside the slice 0), and its masks."""
    layout = width_layout(state.params, state.thresholds)['params']
    param_masks = _as_float(width_masks(state.params, layout, rate=rate))
    stat_masks = _as_float(
        width_masks(state.batch_stats, _stats_layout(state.batch_stats), rate=rate)
    )
    return SliceWork(
        rate=rate,
        params=jax.tree.map(jnp.multiply, state.params, param_masks),
        batch_stats=state.batch_stats,
        param_masks=param_masks,
        stat_masks=stat_masks,
    )


def round_constants(local_cfg: LocalConfig, state):
    return client_lib.learning_rate(local_cfg, state.round), state.thresholds


def client_start(tx, state, rate, key):
    del key
    work = slice_of(state, rate)
    return work, tx.init(work.params)


def client_step(
    model, tx, local_cfg: LocalConfig, macs, work, opt_state, x, y, example_mask, constants, key
):
    """One SGD step on the client's slice."""
    del example_mask, key  # full batches only; nothing drawn
    lr, thresholds = constants

    def loss_fn(params):
        # Multiplying by the mask (not slicing) keeps one static shape for every width; the
        # entries outside the slice get zero gradient, so they stay 0.
        cut = jax.tree.map(jnp.multiply, params, work.param_masks)
        logits, batch_stats = _common.apply_train(model, cut, thresholds, work.batch_stats, x)
        ce, correct = _common.cross_entropy(logits, y)
        return ce, (batch_stats, correct)

    (loss, (batch_stats, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(work.params)
    updates, opt_state = tx.update(grads, opt_state)
    params = jax.tree.map(lambda p, u: p - lr * u, work.params, updates)
    flops = _common.step_flops(
        macs, _kernel_fractions(work.param_masks, thresholds), local_cfg.batch_size
    )
    metrics = {
        'loss': loss,
        'correct': correct.astype(jnp.float32),
        'steps': jnp.float32(1.0),
        'flops': flops,
        'examples': jnp.float32(local_cfg.batch_size),
    }
    return work.replace(params=params, batch_stats=batch_stats), opt_state, metrics


def client_end(work, opt_state):
    """The client sends its slice (0 outside it) and the masks of what it holds."""
    del opt_state
    held = lambda tree, masks: jax.tree.map(jnp.multiply, tree, masks)
    return work.rate, (
        held(work.params, work.param_masks),
        work.param_masks,
        held(work.batch_stats, work.stat_masks),
        work.stat_masks,
    )


def server_update(state, mean, clients):
    params, param_holders, stats, stat_holders = mean
    # mean(holds * value) / mean(holds): the mean over the clients that hold an entry.
    over_holders = lambda v, h, old: jnp.where(h > 0, v / jnp.where(h > 0, h, 1.0), old)
    return state.replace(
        params=jax.tree.map(over_holders, params, param_holders, state.params),
        batch_stats=jax.tree.map(over_holders, stats, stat_holders, state.batch_stats),
        clients=clients,
        round=state.round + 1,
    )


def eval_variables(state, rate, count):
    del count
    work = slice_of(state, rate)
    variables = {
        'params': work.params,
        'thresholds': state.thresholds,
        'batch_stats': work.batch_stats,
    }
    return variables, variables


def eval_density(state, rates, counts):
    del counts
    layout = width_layout(state.params, state.thresholds)['params']

    def one(rate):
        kernels = masking.kernels_of(width_masks(state.params, layout, rate=rate), state.thresholds)
        rows = jnp.stack(
            [
                jnp.mean(jnp.any(m, axis=tuple(range(m.ndim - 1))).astype(jnp.float32))
                for m in jax.tree.leaves(kernels)
            ]
        )
        return rows, _common.weight_density(kernels)[1]

    rows, kept = jax.vmap(one)(rates)
    return {'layer_density': rows, 'kept_weights': kept}


def algorithm(
    model: nn.Module,
    local_cfg: LocalConfig,
    round_cfg: RoundConfig = RoundConfig(),
    macs=None,
    *,
    method_cfg: HeteroFLConfig = HeteroFLConfig(),
) -> algorithm_lib.Algorithm:
    """HeteroFL as an `algorithm.Algorithm`: a client trains its slice of the global model; each
    entry becomes the mean over the clients that hold it (entries nobody holds keep their value)."""
    del round_cfg, method_cfg  # the widths live in the state
    _common.check_full_batches(local_cfg)
    model = _common.dense_model(model)
    tx = client_lib.make_optimizer(local_cfg)
    return algorithm_lib.Algorithm(
        name='heterofl',
        model=model,
        state_type=HeteroFLState,
        round_constants=functools.partial(round_constants, local_cfg),
        client_start=functools.partial(client_start, tx),
        client_step=functools.partial(client_step, model, tx, local_cfg, macs),
        client_end=client_end,
        server_update=server_update,
        eval_variables=eval_variables,
        eval_density=eval_density,
    )


def submodel_size(model_variables: dict, rate: float) -> int:
    """Weights and BatchNorm statistics a client of width `rate` holds (what it sends and receives)."""
    layout = width_layout(model_variables['params'], model_variables['thresholds'])['params']
    stats = model_variables.get('batch_stats', {})
    held = [
        width_masks(model_variables['params'], layout, rate=rate, xp=np),
        width_masks(stats, _stats_layout(stats), rate=rate, xp=np),
    ]
    return int(sum(np.sum(m) for m in jax.tree.leaves(held)))


def communication_bits(
    num_clients: int,
    clients_per_round: int,
    model_variables: dict,
    *,
    method_cfg: HeteroFLConfig = HeteroFLConfig(),
    sampled=None,
) -> tuple[float, float]:
    """(bits up, bits down) per round: each sampled client's sub-model, 32 bits per entry, each way.

    The sizes depend on which clients are sampled: with `sampled` (client ids) the exact count of that
    round (ints); without, the expectation under uniform sampling, clients_per_round x the mean
    sub-model size over all clients (may be fractional).
    """
    rates = client_rates(num_clients, method_cfg)
    sizes = {r: submodel_size(model_variables, float(r)) for r in set(rates.tolist())}
    if sampled is not None:
        bits = BITS_PER_FLOAT * sum(sizes[float(rates[k])] for k in np.asarray(sampled))
        return bits, bits
    total = sum(sizes[float(r)] for r in rates)
    bits = BITS_PER_FLOAT * clients_per_round * total / num_clients
    return bits, bits
