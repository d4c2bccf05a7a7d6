"""SpaFL in JAX: federated learning with one trainable threshold per neuron or filter.

The library is a set of pure functions: `client` (local training of one client's masked model),
`server` (threshold aggregation and the importance update), `federated` (rounds over clients),
`masking` and `models` (structured masks and the networks), `data` (datasets and the Dirichlet
split), and `execution` (the sharded runner). `train.train_and_evaluate` is the whole run that
`experiments/main.py` drives.
"""

__version__ = '0.1.0'
