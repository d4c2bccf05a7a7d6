"""A run's configuration: validated once, before anything is loaded or compiled, and turned into
frozen, typed `Settings`, which is all the rest of the runner reads. The defaults live in
`configs/default.py` alone; the library's own typed configs (`client.LocalConfig`,
`federated.RoundConfig`, `client.DataSpec`) are made from the settings here."""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping
from typing import Any

import ml_collections

from spafl_jax import checks
from spafl_jax import client as client_lib
from spafl_jax import federated
from spafl_jax import data as data_lib
from spafl_jax.checks import ConfigError  # re-exported: callers catch configuration.ConfigError
from spafl_jax.client import AUGMENTATIONS, COLLAPSE_CHECKS
from spafl_jax import masking
from spafl_jax import methods
from spafl_jax import models
from spafl_jax import store as store_lib
from spafl_jax import writers as writers_lib
from spafl_jax.configs import default
from spafl_jax.execution import CLIENT_EXECUTIONS, DISTRIBUTED
from spafl_jax.algorithm import AGGREGATIONS
from spafl_jax.federated import CLIENT_INITS, IMPORTANCE_UPDATES

COMPUTE_DTYPES = ('float32', 'bfloat16')
CONV_IMPLS = ('auto', 'im2col', 'xla')


def _choice(config, field, allowed):
    checks.choice('config', field, config[field], allowed)


def _number(config, field, **kwargs):
    checks.number('config', field, config[field], **kwargs)


def default_fields() -> tuple[str, ...]:
    """Every field of `configs/default.py`: a run's config must have them all (the defaults live
    there and nowhere else, so no module needs a fallback value of its own)."""
    return tuple(default.get_config().keys())


# How and where a run executes, never what it computes: a checkpoint written on one machine
# resumes on another (1, 2 or 4 devices give the same bits; see execution.py), and tables that
# list the settings in which runs differ leave these out.
EXECUTION_FIELDS = (
    'client_execution',
    'vmap_lanes',
    'eval_chunk',
    'eval_lanes',
    'num_cpu_devices',
    'distributed',
    'coordinator_address',
    'num_processes',
    'process_id',
    'conv_impl',
    'scan_unroll',
    'data_dir',
    'download',
    'writers',
)
# How long a run goes and what it reports.
REPORTING_FIELDS = (
    'rounds',
    'eval_every',
    'eval_panel',
    'eval_sweep_every',
    'checkpoint_every',
    'sparsity_rounds',
    'max_loss',
)
# The one list of fields that may change when a run is resumed.
RESUMABLE_FIELDS = REPORTING_FIELDS + EXECUTION_FIELDS
# Fields that older versions had and nothing reads any more: a workdir whose config.json holds
# one still resumes.
REMOVED_FIELDS = ('eval_batch_size',)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError on the first field that is wrong."""
    for field in default_fields():
        if field not in config:
            raise ConfigError(
                f'config.{field} is missing; start from spafl_jax/configs/default.py.'
            )
    _choice(config, 'dataset', data_lib.DATASETS)
    _choice(config, 'model', tuple(sorted(models.MODELS)))
    _choice(config, 'estimator', tuple(sorted(masking.ESTIMATORS)))
    _choice(config, 'importance_update', IMPORTANCE_UPDATES)
    _choice(config, 'aggregation', AGGREGATIONS)
    _choice(config, 'augment', AUGMENTATIONS)
    _choice(config, 'compute_dtype', COMPUTE_DTYPES)
    _choice(config, 'conv_impl', CONV_IMPLS)
    _choice(config, 'client_execution', CLIENT_EXECUTIONS)
    _validate_execution(config)
    for field in (
        'num_clients',
        'clients_per_round',
        'rounds',
        'batch_size',
        'local_epochs',
        'eval_every',
        'scan_unroll',
        'checkpoint_every',
    ):
        _number(config, field, positive=True, integer=True)
    # Seeds feed NumPy's and JAX's generators, which take unsigned 32-bit values.
    _number(config, 'seed', non_negative=True, integer=True, at_most=2**32 - 1)
    if config.clients_per_round > config.num_clients:
        raise ConfigError(
            f'config.clients_per_round={config.clients_per_round} must be <= '
            f'config.num_clients={config.num_clients}: sampling is without '
            'replacement.'
        )
    _number(config, 'alpha', positive=True)
    _number(config, 'lr', positive=True)
    _number(config, 'lr_decay', positive=True, at_most=1.0)
    _number(config, 'min_lr', non_negative=True)
    _number(config, 'clip', non_negative=True)
    _number(config, 'th_coeff', non_negative=True)
    _number(config, 'max_loss', positive=True)
    for field in ('download', 'lazy_importance', 'checkpoint_digest'):
        checks.boolean('config', field, config[field])
    if not isinstance(config.writers, str):
        raise ConfigError(
            f'config.writers={config.writers!r} must be a comma-separated '
            "string such as 'wandb' or 'wandb,clu' (empty: none)."
        )
    problem = writers_lib.problem(config.writers)
    if problem:
        raise ConfigError(problem)
    for field in ('penalty_warmup', 'persistent_optimizer', 'raw_pixels', 'drop_last'):
        checks.boolean('config', field, config[field])
    rounds = config.sparsity_rounds
    if not isinstance(rounds, (tuple, list)) or not all(
        isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in rounds
    ):
        raise ConfigError(
            f'config.sparsity_rounds={rounds!r} must be a tuple of positive round '
            'numbers, e.g. (1, 10, 25).'
        )
    if config.data_dir is not None and not isinstance(config.data_dir, str):
        raise ConfigError(
            f'config.data_dir={config.data_dir!r} must be a path, or empty for the default places.'
        )
    if (
        config.data_dir
        and os.path.exists(os.path.expanduser(config.data_dir))
        and not (os.path.isdir(os.path.expanduser(config.data_dir)))
    ):
        raise ConfigError(
            f'config.data_dir={config.data_dir!r} is a file, not a directory; give '
            'the directory that holds the data files, or leave it empty.'
        )
    validate_method(config)


def validate_method(config: ml_collections.ConfigDict) -> None:
    """config.method, and every baseline's settings in config.baseline (whatever the method, so that
    a comparison of several methods fails before its first run, not in its fourth)."""
    for field in ('method', 'baseline'):
        if field not in config:
            raise ConfigError(
                f'config.{field} is missing; start from spafl_jax/configs/default.py.'
            )
    _choice(config, 'method', methods.METHODS)
    if not config.drop_last and config.method != 'spafl':
        raise ConfigError(
            f'config.drop_last=False applies to spafl only: config.method='
            f'{config.method!r} trains on full batches; drop the override.'
        )
    _choice(config, 'collapse_check', COLLAPSE_CHECKS)
    if config.collapse_check != 'current' and config.method != 'spafl':
        raise ConfigError(
            f'config.collapse_check={config.collapse_check!r} applies to spafl '
            f'only: config.method={config.method!r} has no collapse reset; drop '
            'the override.'
        )
    panel = config.eval_panel
    if config.collapse_check == 'previous' and panel < config.num_clients:
        raise ConfigError(
            f"config.collapse_check='previous' changes every client its test reaches, so "
            f'all are tested each evaluated round: set config.eval_panel >= '
            f'config.num_clients={config.num_clients}, or collapse_check to current.'
        )
    _choice(config, 'client_init', CLIENT_INITS)
    if config.client_init != 'shared' and config.method not in methods.OWN_INITIAL_MODELS:
        raise ConfigError(
            f'config.client_init={config.client_init!r} applies to '
            f'{" and ".join(methods.OWN_INITIAL_MODELS)} only: '
            f'config.method={config.method!r} starts every client from one '
            'global model; drop the override.'
        )
    if not isinstance(config.baseline, (ml_collections.ConfigDict, dict)):
        raise ConfigError(
            f'config.baseline={config.baseline!r} must be a ConfigDict of baseline '
            'settings, e.g. config.baseline.fedspa_density = 0.5.'
        )
    try:
        methods.check_settings(config.baseline)
    except ValueError as e:
        raise ConfigError(str(e)) from None


CLIENT_STORES = ('device', 'disk')  # config.client_store (spafl_jax/store.py)


def _validate_client_store(config: ml_collections.ConfigDict) -> None:
    _choice(config, 'client_store', CLIENT_STORES)
    if config.client_store == 'device':
        return
    problem = store_lib.refusal(
        config.client_store,
        method=config.method,
        importance_update=config.importance_update,
        lazy_importance=config.lazy_importance,
        collapse_check=config.collapse_check,
        multi_process=config.distributed != 'off' or config.num_processes > 1,
    )
    if problem:
        raise ConfigError(problem)


def _validate_execution(config: ml_collections.ConfigDict) -> None:
    """The execution fields."""
    _number(config, 'vmap_lanes', non_negative=True, integer=True)
    _number(config, 'num_cpu_devices', integer=True)
    if config.num_cpu_devices < -1:
        raise ConfigError(
            f'config.num_cpu_devices={config.num_cpu_devices!r} must be -1 (one '
            "device per CPU core), 0 (JAX's single CPU device) or a count > 0."
        )
    _number(config, 'eval_lanes', non_negative=True, integer=True)
    for field in ('eval_chunk', 'num_processes', 'eval_panel', 'eval_sweep_every'):
        _number(config, field, positive=True, integer=True)
    _number(config, 'process_id', non_negative=True, integer=True, at_most=config.num_processes - 1)
    address = config.coordinator_address or ''
    _choice(config, 'distributed', DISTRIBUTED)
    if config.distributed == 'auto' and (address or config.num_processes > 1):
        raise ConfigError(
            "config.distributed='auto' detects the processes itself: leave "
            'config.coordinator_address and config.num_processes unset, or set '
            "config.distributed='off' to give them by hand."
        )
    if not isinstance(address, str) or (address and ':' not in address):
        raise ConfigError(
            f'config.coordinator_address={address!r} must be "" (one process) or '
            '"host:port" of process 0.'
        )
    if config.num_processes > 1 and not address:
        raise ConfigError(
            f'config.num_processes={config.num_processes} needs '
            'config.coordinator_address="host:port" of process 0.'
        )
    _validate_client_store(config)


@dataclasses.dataclass(frozen=True)
class Settings:
    """A run's configuration, validated and frozen: the fields of `configs/default.py` (every
    one documented there), grouped as there. Built once by `settings(config)`."""

    # Data.
    dataset: str
    data_dir: str
    download: bool
    writers: str
    raw_pixels: bool
    augment: str
    num_clients: int
    clients_per_round: int
    alpha: float
    # Model and mask.
    model: str
    estimator: str
    client_init: str
    # Local training.
    rounds: int
    batch_size: int
    drop_last: bool
    collapse_check: str
    local_epochs: int
    lr: float
    lr_decay: float
    min_lr: float
    clip: float
    th_coeff: float
    penalty_warmup: bool
    persistent_optimizer: bool
    # Server and method.
    importance_update: str
    lazy_importance: bool
    aggregation: str
    method: str
    baseline: Mapping[str, Any]  # read-only
    # Execution.
    client_execution: str
    vmap_lanes: int
    eval_chunk: int
    eval_lanes: int
    num_cpu_devices: int
    distributed: str
    coordinator_address: str
    num_processes: int
    process_id: int
    conv_impl: str
    compute_dtype: str
    scan_unroll: int
    # Evaluation and bookkeeping.
    eval_every: int
    eval_panel: int
    eval_sweep_every: int
    client_store: str
    seed: int
    max_loss: float
    checkpoint_every: int
    checkpoint_digest: bool
    sparsity_rounds: tuple[int, ...]


def settings(config: ml_collections.ConfigDict) -> Settings:
    """`config` validated (`validate`: ConfigError on the first wrong field) and frozen."""
    validate(config)
    values = {f.name: config[f.name] for f in dataclasses.fields(Settings)}
    values['baseline'] = types.MappingProxyType(dict(config.baseline))
    values['sparsity_rounds'] = tuple(config.sparsity_rounds)
    return Settings(**values)


def local_config(s: Settings) -> client_lib.LocalConfig:
    """What a client's local training needs of the settings."""
    return client_lib.LocalConfig(
        batch_size=s.batch_size,
        local_epochs=s.local_epochs,
        lr=s.lr,
        lr_decay=s.lr_decay,
        min_lr=s.min_lr,
        clip=s.clip,
        th_coeff=s.th_coeff,
        penalty_warmup=s.penalty_warmup,
        persistent_optimizer=s.persistent_optimizer,
        drop_last=s.drop_last,
        collapse_check=s.collapse_check,
    )


def round_config(s: Settings) -> federated.RoundConfig:
    """What a round needs of the settings beyond the clients' local training."""
    return federated.RoundConfig(
        clients_per_round=s.clients_per_round,
        importance_update=s.importance_update,
        aggregation=s.aggregation,
    )


def data_spec(s: Settings, dataset) -> client_lib.DataSpec:
    """How a client's batches are prepared: the dataset's pixel statistics and the settings'."""
    return client_lib.DataSpec(
        pixel_max=dataset.pixel_max,
        mean=tuple(dataset.mean),
        std=tuple(dataset.std),
        normalize=not s.raw_pixels,
        augment=s.augment,
    )
