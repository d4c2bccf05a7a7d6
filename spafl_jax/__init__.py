"""SpaFL in JAX: federated learning with one trainable threshold per neuron or filter.

The library is a set of pure functions:

- `algorithm`: a federated algorithm as a value (`Algorithm`: client start, step, end; server
  update; evaluation) and the one round that drives any of them (`run_round`, `evaluate`);
- `federated`: SpaFL as such an algorithm (docs/algorithm.md, sections 1-3), `client` (one
  client's masked local training), `server` (threshold aggregation, the importance update),
  `masking`, `layers` and `models` (structured masks and the networks);
- `baselines`: FedAvg, Local, FedPM, HeteroFL and FedSpa, each an `Algorithm`;
- `data` (datasets and the Dirichlet split), `metrics` (accuracy, communication, FLOPs) and
  `execution` (the sharded backend: the `clients` mesh, lanes, several hosts);
- `train.train_and_evaluate`: the whole run that `experiments/main.py` drives.

    import spafl_jax
    alg = spafl_jax.federated.algorithm(model, local_cfg, round_cfg)
    round_fn = spafl_jax.algorithm.make_round_fn(alg, local_cfg, spec)
"""

from spafl_jax import algorithm
from spafl_jax import baselines
from spafl_jax import client
from spafl_jax import data
from spafl_jax import federated
from spafl_jax import layers
from spafl_jax import masking
from spafl_jax import metrics
from spafl_jax import models
from spafl_jax import server

__version__ = '0.1.0'

__all__ = [
    'algorithm',
    'baselines',
    'client',
    'data',
    'federated',
    'layers',
    'masking',
    'metrics',
    'models',
    'server',
    '__version__',
]
