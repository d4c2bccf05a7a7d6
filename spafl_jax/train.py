"""`train_and_evaluate(config, workdir)`: a whole SpaFL run, from the dataset to the figures.

The command line (experiments/main.py) only parses flags and calls this; a notebook can call it too.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spafl_jax import client as client_lib
from spafl_jax import configuration
from spafl_jax import data as data_lib
from spafl_jax import federated
from spafl_jax import masking
from spafl_jax import metrics as metrics_lib
from spafl_jax import models
from spafl_jax import reporting


def local_config(config) -> client_lib.LocalConfig:
    return client_lib.LocalConfig(
        batch_size=config.batch_size, local_epochs=config.local_epochs, lr=config.lr,
        lr_decay=config.lr_decay, min_lr=config.min_lr, clip=config.clip, th_coeff=config.th_coeff,
        penalty_warmup=config.penalty_warmup, persistent_optimizer=config.persistent_optimizer,
        scan_unroll=config.scan_unroll)


def round_config(config) -> federated.RoundConfig:
    return federated.RoundConfig(
        clients_per_round=config.clients_per_round, importance_update=config.importance_update,
        aggregation=config.aggregation, client_execution=config.client_execution)


def data_spec(config, dataset: data_lib.Dataset) -> client_lib.DataSpec:
    return client_lib.DataSpec(pixel_max=dataset.pixel_max, mean=tuple(dataset.mean),
                               std=tuple(dataset.std), normalize=not config.raw_pixels,
                               augment=config.augment)


def build_model(config, num_classes: int):
    dtype = None if config.compute_dtype == 'float32' else jnp.dtype(config.compute_dtype)
    return models.create_model(config.model, num_classes, estimator=config.estimator,
                               conv_impl=config.conv_impl, compute_dtype=dtype)


def check_model_fits(model, config, image_shape) -> None:
    """Abstract evaluation only (no compilation): does the model accept this dataset's images?"""
    try:
        jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), image_shape))
    except Exception as e:  # pylint: disable=broad-except
        raise configuration.ConfigError(
            f'config.model={config.model!r} does not accept {config.dataset!r} images of shape '
            f'{tuple(image_shape)} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); '
            f'pick a model made for this dataset.') from None


def sample_clients(seed: int, round_index: int, num_clients: int, num_sampled: int) -> np.ndarray:
    """S of N clients uniformly without replacement; depends on (seed, round) only."""
    rng = np.random.default_rng([seed, round_index])
    return np.sort(rng.choice(num_clients, num_sampled, replace=False)).astype(np.int32)


def split_data(config, dataset: data_lib.Dataset):
    try:
        train_ids, test_ids = data_lib.dirichlet_split(
            dataset.train_labels, dataset.test_labels, num_clients=config.num_clients,
            alpha=config.alpha, min_train_examples=config.batch_size, seed=config.seed,
            num_classes=dataset.num_classes)
    except ValueError as e:
        raise configuration.ConfigError(
            f'the Dirichlet split cannot give each of config.num_clients={config.num_clients} '
            f'clients config.batch_size={config.batch_size} examples of {config.dataset} with '
            f'config.alpha={config.alpha} ({e}); use fewer clients, a smaller batch or a larger '
            'alpha.') from None
    train = federated.make_client_data(dataset.train_images, dataset.train_labels, train_ids)
    test = federated.make_client_data(dataset.test_images, dataset.test_labels, test_ids)
    return train, test


def _one_client(tree):
    return jax.tree.map(lambda x: x[0], tree)


def _format_bits(bits: float) -> str:
    for unit, scale in (('Gbit', 1e9), ('Mbit', 1e6), ('kbit', 1e3)):
        if bits >= scale:
            return f'{bits / scale:.2f} {unit}'
    return f'{bits:.0f} bit'


def save_final_state(path: str, state: federated.FederatedState) -> None:
    """All clients' weights, thresholds and BatchNorm statistics (leading client axis), msgpack."""
    tree = {'params': state.clients.params, 'thresholds': state.clients.thresholds,
            'batch_stats': state.clients.batch_stats,
            'server_thresholds': state.server_thresholds}
    payload = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, tree))
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class WorkdirError(RuntimeError):
    """The workdir cannot be used as asked; nothing in it was changed."""


def prepare_workdir(workdir: str) -> None:
    """Creates the workdir, refusing to overwrite the metrics of an earlier run."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f'workdir {workdir!r} cannot be created ({e.strerror}); '
                           'pass a writable --workdir.') from None
    if not os.access(workdir, os.W_OK):
        raise WorkdirError(f'workdir {workdir!r} is not writable; pass a writable --workdir.')
    metrics_path = os.path.join(workdir, reporting.METRICS_FILENAME)
    if os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0:
        raise WorkdirError(f'workdir {workdir!r} already holds the metrics of a run; pass another '
                           '--workdir (or delete that one) to start a new run.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs SpaFL as configured and writes config.json, metrics.jsonl, summary.json and figures."""
    configuration.validate(config)
    dataset = data_lib.load_dataset(config.dataset, os.path.expanduser(config.data_dir or '') or None)
    model = build_model(config, dataset.num_classes)
    check_model_fits(model, config, dataset.image_shape)
    prepare_workdir(workdir)
    reporting.write_json_atomic(os.path.join(workdir, 'config.json'), config.to_dict())

    train_data, test_data = split_data(config, dataset)
    local_cfg, round_cfg = local_config(config), round_config(config)
    spec = data_spec(config, dataset)
    seed_key = jax.random.key(config.seed)
    state = federated.init_state(model, local_cfg, jax.random.fold_in(seed_key, -1 % 2**31),
                                 config.num_clients, dataset.image_shape)
    one = _one_client(state.clients)
    variables = {'params': one.params, 'thresholds': one.thresholds, 'batch_stats': one.batch_stats}
    macs = federated.layer_macs(model, variables, dataset.image_shape)
    names = masking.layer_names(one.thresholds)
    num_thresholds = sum(t.size for t in jax.tree.leaves(one.thresholds))
    masked_weights = sum(k.size for k in jax.tree.leaves(masking.kernels_of(one.params,
                                                                            one.thresholds)))
    num_params = sum(p.size for p in jax.tree.leaves(one.params))
    bits_up_round, bits_down_round = metrics_lib.spafl_bits_per_round(
        num_thresholds, config.num_clients, config.clients_per_round, config.importance_update)
    dense_bits_round = metrics_lib.dense_bits_per_round(num_params, config.clients_per_round)
    logging.info('%s on %s: %d clients (%d per round), %d masked weights, %d thresholds; '
                 'train examples per client %d..%d', config.model, config.dataset,
                 config.num_clients, config.clients_per_round, masked_weights, num_thresholds,
                 int(train_data.counts.min()), int(train_data.counts.max()))

    round_fn = federated.make_round_fn(model, local_cfg, round_cfg, spec, macs)
    eval_fn = federated.make_eval_fn(model, spec, config.eval_batch_size)
    writer = reporting.MetricsWriter(workdir)
    records, totals = [], {'bits_up': 0, 'bits_down': 0, 'flops': 0.0, 'steps': 0.0,
                           'max_steps': 0.0}
    run_start = time.time()
    round_seconds = []
    try:
        for r in range(config.rounds):
            start = time.time()
            sampled = jnp.asarray(sample_clients(config.seed, r, config.num_clients,
                                                 config.clients_per_round))
            state, round_metrics = round_fn(state, train_data, sampled, seed_key)
            totals['bits_up'] += bits_up_round
            totals['bits_down'] += bits_down_round
            evaluate_now = (r + 1) % config.eval_every == 0 or r + 1 == config.rounds
            if not evaluate_now:
                round_metrics = jax.device_get(round_metrics)
            else:
                evaluation = eval_fn(state.clients, test_data)
                round_metrics, evaluation = jax.device_get((round_metrics, evaluation))
            totals['flops'] += float(round_metrics['flops'])
            totals['steps'] += float(round_metrics['local_steps'])
            totals['max_steps'] += float(round_metrics['max_steps'])
            round_seconds.append(time.time() - start)
            if not evaluate_now:
                continue
            record = {
                'round': r + 1,
                **metrics_lib.accuracy_summary(evaluation['correct'], evaluation['counts']),
                **metrics_lib.density_summary(evaluation['layer_density'],
                                              evaluation['kept_weights'], masked_weights, names),
                'bits_up': totals['bits_up'], 'bits_down': totals['bits_down'],
                'bits_dense_equivalent': dense_bits_round * (r + 1),
                'flops': totals['flops'] / config.num_clients,
                'train_loss': float(round_metrics['train_loss']),
                'useful_step_fraction': totals['steps'] / max(totals['max_steps'], 1.0),
                'seconds': round_seconds[-1],
            }
            writer.write(record)
            records.append(record)
            logging.info('round %d/%d | accuracy %.2f%% | density %.2f%% (weights %.2f%%) | '
                         'up %s down %s | loss %.3f | %.2fs', r + 1, config.rounds,
                         100 * record['accuracy'], 100 * record['density'],
                         100 * record['density_weighted'], _format_bits(record['bits_up']),
                         _format_bits(record['bits_down']), record['train_loss'], record['seconds'])
    finally:
        writer.close()
    save_final_state(os.path.join(workdir, 'final_state.msgpack'), state)
    final = records[-1]
    steady = round_seconds[1:] or round_seconds
    summary = {
        **{k: v for k, v in final.items() if k != 'seconds'},
        'rounds': config.rounds,
        'num_thresholds': num_thresholds,
        'masked_weights': masked_weights,
        'num_params': num_params,
        'seconds_total': time.time() - run_start,
        'seconds_first_round': round_seconds[0],
        'seconds_per_round': float(np.mean(steady)),
    }
    reporting.write_json_atomic(os.path.join(workdir, 'summary.json'), summary)
    reporting.plot_metrics(records, workdir)
    first_kernel = jax.tree.leaves(masking.kernels_of(state.clients.params,
                                                      state.clients.thresholds))[0]
    first_threshold = jax.tree.leaves(state.clients.thresholds)[0]
    masks = np.asarray(jax.vmap(masking.hard_row_mask)(first_kernel, first_threshold))
    reporting.plot_sparsity_pattern(masks.astype(np.float32),
                                    os.path.join(workdir, 'sparsity_first_layer.png'),
                                    title=f'{names[0]}: kept rows per client, round {config.rounds}')
    return summary
