"""Compact export: a client's structurally sparse model rewritten as a smaller dense one.

SpaFL prunes whole output rows (neurons, filters), so a client's model can be made physically
smaller: drop the pruned rows of a masked layer, the matching input channels of the layer after it and
the matching BatchNorm entries. `compact_model` does that and returns plain arrays plus a JSON-able
description; `compact_apply` (jnp) and `numpy_apply` (numpy only) run it; `save_compact` /
`load_compact` store it as `.npz` + `.json`, and `standalone_source` is a numpy-only module that loads
and runs an export without this package or JAX. The forward pass and the files are in
`compact_forward`, the walk of each architecture in `compact_builders`; this module is the API.

Exactness. A pruned row's pre-activation is exactly 0, but what reaches the next layer is not always 0:
BatchNorm maps 0 to `c = bias - mean * scale / sqrt(var + eps)`, ReLU to `max(c, 0)`, and a max-pool
of a constant channel is that constant. A dropped channel therefore feeds the next layer a constant
per channel. We fold it into the next layer:
  - dense layer (also after a flatten, whose NHWC features are (h, w, c) with c fastest): a bias
    `sum_c W[c, :] * c_c`;
  - VALID conv: the same constant at every output position, a bias `sum_{i,j,c} W[i, j, c, :] * c_c`;
  - padded conv ('SAME' or explicit pads): border outputs see fewer in-image taps, so the
    contribution depends on the position. It is stored as a one-channel `const_kernel`
    `sum_c W[:, :, c, :] * c_c` and added as `conv(ones_image, const_kernel)` — exact for any size.
Everything is exact up to float rounding (sums in a different order); the tests check 1e-5.

Evaluation applies `masking.reset_collapsed_thresholds` before the forward pass, so we do too: the
compact model reproduces `model.apply(eval_variables(variables), x, train=False)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence

from flax import serialization
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spafl_jax import compact_builders
from spafl_jax import files
from spafl_jax import masking
from spafl_jax import models
from spafl_jax import hardware

# The forward pass and the files of a compact model, in `compact_forward`; they are part of this API.
from spafl_jax.compact_forward import (  # noqa: F401
    compact_apply,
    load_compact,
    numpy_apply,
    save_compact,
    standalone_source,
)

FORMAT = 'spafl_compact/1'


# ----------------------------------------------------------------------------------------------------
# Reduction.


@dataclasses.dataclass(frozen=True)
class CompactModel:
    """A compact model: a JSON-able `description` and its flat `params` ('layer/param' -> array)."""

    description: dict
    params: dict[str, np.ndarray]

    @property
    def num_parameters(self) -> int:
        """Float entries (the int `index` of an output gather is bookkeeping, not a parameter)."""
        return int(sum(v.size for v in self.params.values() if v.dtype.kind == 'f'))


def eval_variables(variables: dict) -> dict:
    """The variables evaluation uses: thresholds after the density-collapse reset."""
    return {
        'params': variables['params'],
        'thresholds': masking.reset_collapsed_thresholds(
            variables['params'], variables['thresholds']
        ),
        'batch_stats': variables.get('batch_stats', {}),
    }


def count_parameters(variables: dict) -> int:
    """Weights and BatchNorm statistics of a masked model (thresholds only select rows)."""
    leaves = jax.tree.leaves((variables['params'], variables.get('batch_stats', {})))
    return int(sum(np.size(leaf) for leaf in leaves))


SUPPORTED_MODELS = ('digits_cnn', 'lenet5', 'conv4', 'resnet18', 'vit')


def compact_model(model: nn.Module | str, variables: dict) -> CompactModel:
    """The compact equivalent of one client's masked model.

    Args:
      model: the model, or a key of `models.MODELS` (its default sizes); the model's
        `export_plan()`, declared beside its definition, says what to walk.
      variables: ONE client's {'params', 'thresholds', 'batch_stats'} (no client axis).
    Returns:
      A `CompactModel` whose `compact_apply(description, params, x)` equals
      `model.apply(eval_variables(variables), x, train=False)` to float tolerance on any input.
    Raises:
      ValueError: an unknown model, or (sequential models) a masked layer with every row pruned,
        whose output is then a constant.
    """
    if isinstance(model, str):
        if model not in SUPPORTED_MODELS:
            raise ValueError(
                f'model={model!r}: compact export supports {", ".join(SUPPORTED_MODELS)}.'
            )
        model = models.create_model(model, 10)
    name = next((k for k, cls in models.MODELS.items() if type(model) is cls), type(model).__name__)
    if not hasattr(model, 'export_plan'):
        raise ValueError(
            f'{type(model).__name__} declares no export_plan(); compact export '
            f'supports {", ".join(SUPPORTED_MODELS)}.'
        )
    kind, plan = model.export_plan()
    layers, params = compact_builders.build(name, variables, kind, plan)
    params = {k: np.ascontiguousarray(v) for k, v in params.items()}
    description = {'format': FORMAT, 'model': name, 'layers': layers}
    return CompactModel(description=description, params=params)


# ----------------------------------------------------------------------------------------------------
# Workdirs: every client of a run, exported and timed.

IMAGE_SHAPES = {
    'digits': (8, 8, 1),
    'fashion_mnist': (28, 28, 1),
    'cifar10': (32, 32, 3),
    'cifar100': (32, 32, 3),
}
STATE_FILE = 'final_state.msgpack'


def load_client_variables(workdir: str) -> tuple[str, list[dict]]:
    """(model name, one variables dict per client) from a run's workdir.

    Contract with the runner: `workdir/config.json` has at least 'model' and 'num_clients';
    `workdir/final_state.msgpack` is `flax.serialization.msgpack_serialize(jax.tree.map(np.asarray,
    {'params': ..., 'thresholds': ..., 'batch_stats': ...}))` with a leading client axis
    `[num_clients, ...]` on every leaf.
    """
    with open(os.path.join(workdir, 'config.json')) as f:
        config = json.load(f)
    with open(os.path.join(workdir, STATE_FILE), 'rb') as f:
        state = serialization.msgpack_restore(f.read())
    missing = {'params', 'thresholds'} - set(state)
    if missing:
        raise ValueError(
            f'{workdir}/{STATE_FILE} lacks {sorted(missing)}; expected params, '
            'thresholds and batch_stats stacked over clients.'
        )
    state = {
        'params': state['params'],
        'thresholds': state['thresholds'],
        'batch_stats': state.get('batch_stats') or {},
    }
    num_clients = int(config['num_clients'])
    for leaf in jax.tree.leaves(state):
        if np.shape(leaf)[0] != num_clients:
            raise ValueError(
                f'{workdir}/{STATE_FILE}: a leaf of shape {np.shape(leaf)} has no leading '
                f'axis of num_clients={num_clients}.'
            )
    clients = [jax.tree.map(lambda a, i=i: np.asarray(a[i]), state) for i in range(num_clients)]
    return config['model'], clients


def image_shape_of(config: dict) -> tuple[int, int, int]:
    if 'image_shape' in config:
        return tuple(config['image_shape'])
    if config.get('dataset') not in IMAGE_SHAPES:
        raise ValueError(
            f'dataset={config.get("dataset")!r}: no known image shape; add '
            '"image_shape" to config.json.'
        )
    return IMAGE_SHAPES[config['dataset']]


def output_features(description: dict) -> int:
    return int(description['layers'][-1]['features'])


def time_forwards(fns_and_args, repeats: int = 20) -> list[float]:
    """Median seconds of one call of each jitted `fn(*args)`, compilation and warm-up excluded.

    The calls alternate between the functions, so load changes on a shared machine hit both alike
    and their ratio is measured in one run.
    """
    for fn, args in fns_and_args:
        jax.block_until_ready(fn(*args))  # compile
        jax.block_until_ready(fn(*args))  # warm-up
    times = [[] for _ in fns_and_args]
    for _ in range(repeats):
        for t, (fn, args) in zip(times, fns_and_args):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            t.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def export_workdir(
    workdir: str,
    out_dir: str,
    *,
    batch_size: int = 256,
    repeats: int = 20,
    seed: int = 0,
    loader=load_client_variables,
    clients: Sequence[int] | None = None,
) -> list[dict]:
    """Exports every client of a run (or the ids in `clients`) to `out_dir/client_XXX.{npz,json}`
    and times both models.

    Returns one row per client: parameters before/after, bytes on disk, median jitted forward time of
    the masked and the compact model on the same random batch, their ratio, and the largest
    |logit difference| (a check of exactness on that batch). A client that cannot be exported (a
    layer entirely pruned) gets an 'error' entry instead.
    """
    with open(os.path.join(workdir, 'config.json')) as f:
        config = json.load(f)
    model_name, all_clients = loader(workdir)
    if clients is None:
        clients = range(len(all_clients))
    unknown = sorted(set(clients) - set(range(len(all_clients))))
    if unknown:
        raise ValueError(
            f'clients {unknown} are not in the run; it has clients 0..{len(all_clients) - 1}.'
        )
    image_shape = image_shape_of(config)
    os.makedirs(out_dir, exist_ok=True)
    files.write_atomic(os.path.join(out_dir, 'compact_numpy.py'), standalone_source())
    x = jax.random.normal(jax.random.key(seed), (batch_size, *image_shape), jnp.float32)
    rows = []
    model = masked_fn = None
    for i in clients:
        variables = all_clients[i]
        row = {'client': i, 'params_before': count_parameters(variables)}
        try:
            compact = compact_model(model_name, variables)
        except ValueError as e:
            rows.append({**row, 'error': str(e)})
            continue
        if model is None:
            model = models.create_model(
                model_name,
                output_features(compact.description),
                conv_impl=config.get('conv_impl', 'auto'),
            )
            # Both forwards compile with the options training used (`hardware.jit`).
            # `model` is built once, in the first iteration, and never rebound.
            masked_fn = hardware.jit(
                lambda v, images: model.apply(v, images, train=False),  # noqa: B023
                model=model,
            )
        prefix = os.path.join(out_dir, f'client_{i:03d}')
        row['bytes'] = save_compact(prefix, compact.description, compact.params)
        row['params_after'] = compact.num_parameters
        ev = jax.device_put(eval_variables(variables))
        params = jax.device_put(compact.params)
        compact_fn = hardware.jit(
            lambda p, images, d=compact.description: compact_apply(d, p, images), model=model
        )
        row['max_abs_diff'] = float(jnp.max(jnp.abs(masked_fn(ev, x) - compact_fn(params, x))))
        row['masked_s'], row['compact_s'] = time_forwards(
            [(masked_fn, (ev, x)), (compact_fn, (params, x))], repeats
        )
        row['speedup'] = row['masked_s'] / row['compact_s']
        rows.append(row)
    return rows
