r"""Where a LeNet-5 training step loses time on XLA:CPU: the same step with other pooling and
first-convolution implementations, run as one jitted call per step and inside a compiled loop.

    python experiments/benchmarks/lenet_step.py

The variants compute the same function (same parameters, same masks; max pooling by reshape gives the
same gradient except on exact ties, which ReLU zeros anyway). `models.LeNet5` is im2col convolutions
with `models.max_pool_2x2` (reshape + max). The ratios say what a change to `layers.py` / `models.py` would buy.
"""

from __future__ import annotations

import functools
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
from spafl_jax.layers import MaskedConv, MaskedDense


def window_pool(x):
    # What models.py used before `max_pool_2x2`: its gradient is a select-and-scatter.
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class LeNet5Variant(nn.Module):
    """`models.LeNet5` with the first conv's implementation and the pooling as fields."""
    first_conv: str = 'im2col'
    pool: str = 'reshape'

    @nn.compact
    def __call__(self, x, train: bool = False):
        pool = models.max_pool_2x2 if self.pool == 'reshape' else window_pool
        conv = functools.partial(MaskedConv, kernel_size=(5, 5), padding='VALID')
        x = pool(nn.relu(conv(20, conv_impl=self.first_conv)(x)))
        x = pool(nn.relu(conv(50, conv_impl='im2col')(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(MaskedDense(500)(x))
        return MaskedDense(10)(x)


def main():
    batch, steps = 64, 10
    cfg = client_lib.LocalConfig(batch_size=batch, lr=0.001, th_coeff=0.002)
    variables = models.init_variables(models.LeNet5(), jax.random.key(0), (28, 28, 1))
    state = client_lib.ClientState(variables['params'], variables['thresholds'], {}, ())
    opt = client_lib.make_optimizer(cfg).init((state.params, state.thresholds))
    xs = jax.random.normal(jax.random.key(1), (steps, batch, 28, 28, 1))
    ys = jax.random.randint(jax.random.key(2), (steps, batch), 0, 10)
    variants = {'models.LeNet5': models.LeNet5(),
                'nn.max_pool (before)': LeNet5Variant(pool='window'),
                'xla conv1': LeNet5Variant(first_conv='xla'),
                'xla conv1 + nn.max_pool': LeNet5Variant(first_conv='xla', pool='window')}
    fns = {}
    for name, model in variants.items():
        one = functools.partial(lambda model, s, o, x, y: client_lib.local_step(
            model, cfg, s, o, x, y, jnp.bool_(True), cfg.lr, cfg.th_coeff)[:2], model)
        step = jax.jit(one)

        def python_loop(step=step):
            s, o = state, opt
            for i in range(steps):
                s, o = step(s, o, xs[i], ys[i])
            return s

        looped = jax.jit(lambda s, o, xs, ys, one=one: jax.lax.fori_loop(
            0, steps, lambda i, c: one(*c, xs[i], ys[i]), (s, o))[0])
        fns[f'{name}, step per call'] = python_loop
        fns[f'{name}, fori_loop'] = functools.partial(looped, state, opt, xs, ys)
    for f in fns.values():
        jax.block_until_ready(f())
    times = {k: [] for k in fns}
    for _ in range(5):
        for k, f in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append((time.perf_counter() - start) / steps)
    base = np.median(times['models.LeNet5, fori_loop'])
    print(f'LeNet-5 training step, batch {batch} (median of 5 x {steps} steps)')
    for k, v in times.items():
        print(f'  {k:<34} {1e3 * np.median(v):7.2f} ms   x{base / np.median(v):.2f} vs '
              'models.LeNet5 in a fori_loop')


if __name__ == '__main__':
    main()
