r"""What PyTorch's BatchNorm semantics cost: a Conv4 training step with `models.BatchNorm` against
the same step with `flax.linen.BatchNorm`, timed alternately in one run (ratio > 1: ours is faster).

    python research/benchmarks/batch_norm.py
    python research/benchmarks/batch_norm.py --repeats=9 --steps=20

The two differ only in the running variance (ours takes the unbiased batch variance, as PyTorch) and
in how the batch variance is computed (ours: mean of squared deviations; Flax: E[x^2] - E[x]^2).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np

from spafl_jax import client as client_lib
from spafl_jax import models
from spafl_jax import hardware


@contextlib.contextmanager
def flax_batch_norm():
    """models.py as it was: `flax.linen.BatchNorm` (momentum 0.9, eps 1e-5)."""
    saved = models._batch_norm  # pylint: disable=protected-access

    def flax_bn(train, axis=-1):
        return nn.BatchNorm(use_running_average=not train, axis=axis, momentum=0.9, epsilon=1e-5)

    models._batch_norm = flax_bn  # pylint: disable=protected-access
    try:
        yield
    finally:
        models._batch_norm = saved  # pylint: disable=protected-access


def make_loop(model, cfg, steps):
    def run(state, opt, x, y):
        def body(_, carry):
            s, o = carry
            s, o, _ = client_lib.local_step(
                model, cfg, s, o, x, y, jnp.bool_(True), lr=cfg.lr, penalty_coeff=1e-4
            )
            return s, o

        return jax.lax.fori_loop(0, steps, body, (state, opt))

    return hardware.jit(run, model=model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--steps', type=int, default=10)
    args = parser.parse_args()
    model = models.create_model('conv4', 10)
    cfg = client_lib.LocalConfig(batch_size=16, lr=0.01)
    variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
    state = client_lib.ClientState(
        params=variables['params'],
        thresholds=variables['thresholds'],
        batch_stats=variables['batch_stats'],
        opt_state=(),
    )
    opt = client_lib.make_optimizer(cfg).init((state.params, state.thresholds))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)

    loops = {}
    for name, context in (
        ('flax.linen.BatchNorm', flax_batch_norm),
        ('models.BatchNorm', contextlib.nullcontext),
    ):
        with context():
            loop = make_loop(model, cfg, args.steps)
            jax.block_until_ready(loop(state, opt, x, y))  # compiled under this BatchNorm
        loops[name] = loop
    times = {name: [] for name in loops}
    for _ in range(args.repeats):
        for name, loop in loops.items():
            start = time.perf_counter()
            jax.block_until_ready(loop(state, opt, x, y))
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    base = np.median(times['flax.linen.BatchNorm'])
    print(f'Conv4 training step, batch 16, {jax.default_backend()}, median of {args.repeats}:')
    for name, values in times.items():
        print(f'  {name:22s} {np.median(values):7.2f} ms   ratio {base / np.median(values):.2f}')


if __name__ == '__main__':
    main()
