"""The paper's comparison baselines, each an `algorithm.Algorithm` that every backend runs.

Every module `m = BASELINES[name]` provides, with `Config = CONFIGS[name]` its hyperparameters:

    m.init_state(model_or_name, local_cfg, rng, num_clients, image_shape, *, num_classes=10,
                 method_cfg=Config()) -> state
    m.algorithm(model, local_cfg, round_cfg, macs=None, *, method_cfg=Config())
        -> algorithm.Algorithm: the method as pure functions, which every backend runs
           (`algorithm.run_round` / `make_round_fn` on one device, `execution.RoundRunner` on a
           mesh); `algorithm.evaluate` scores every client on its own test split
    m.communication_bits(num_clients, clients_per_round, model_variables, *, method_cfg=Config())
        -> (bits up, bits down) per round

`round_cfg` is `federated.RoundConfig` (clients_per_round and aggregation are used;
importance_update is SpaFL's own); `model_variables` is one model's `models.init_variables`. The
baselines run the SpaFL models with every threshold fixed where no row is masked: thresholds are
never trained, penalized or sent (th_coeff, penalty_warmup unused), and the local optimizer is
fresh every round (persistent_optimizer unused).
"""

from __future__ import annotations

from types import ModuleType

from spafl_jax.baselines import fedavg, fedpm, fedspa, heterofl, local

BASELINES: dict[str, ModuleType] = {
    'fedavg': fedavg,
    'local': local,
    'fedpm': fedpm,
    'heterofl': heterofl,
    'fedspa': fedspa,
}

# The hyperparameter dataclass of each method (every field has a default).
CONFIGS = {
    'fedavg': fedavg.FedAvgConfig,
    'local': local.LocalOnlyConfig,
    'fedpm': fedpm.FedPMConfig,
    'heterofl': heterofl.HeteroFLConfig,
    'fedspa': fedspa.FedSpaConfig,
}


def check_baseline(name: str) -> None:
    if name not in BASELINES:
        raise ValueError(
            f'method={name!r} is not a baseline; allowed values: {", ".join(sorted(BASELINES))}.'
        )


def get(name: str) -> ModuleType:
    """The module of baseline `name` (see the module docstring for its functions)."""
    check_baseline(name)
    return BASELINES[name]


def make_config(name: str, **overrides):
    """The method's hyperparameters: its defaults with `overrides` applied, validated."""
    check_baseline(name)
    cfg = CONFIGS[name](**overrides)
    if hasattr(cfg, 'validate'):
        cfg.validate()
    return cfg
