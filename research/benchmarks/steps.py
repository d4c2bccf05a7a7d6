r"""Where a training step loses time on XLA:CPU: each conv model's step in both activation layouts,
with XLA's YNNPACK fusions on (its default) and off, inside a compiled loop; ratios in one run.

    python research/benchmarks/steps.py
    python research/benchmarks/steps.py --models=lenet5 --repeats=9

Every variant computes the same function with the same parameters and masks (tests/test_models.py
checks the layouts agree). For LeNet-5 two earlier forms of the model are timed too: the one before
the layout change (NHWC, ReLU then a single 2x2 max-reduction) and the one before that (`nn.max_pool`,
whose gradient is a select-and-scatter). The ratios say which defaults `models.py` should carry
(`layout`, `xla_cpu_ynnpack`).
"""

from __future__ import annotations

import argparse
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
from spafl_jax import hardware

# model -> (image shape, official batch size)
MODELS = {'digits_cnn': ((8, 8, 1), 16), 'lenet5': ((28, 28, 1), 64), 'conv4': ((32, 32, 3), 16)}


def _window_reduce_pool(x):
    # One max-reduction over each 2x2 window (models.py before the two-pass pooling).
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class EarlierLeNet5(models.MaskedNet):
    """`models.LeNet5` as it was written before: NHWC, ReLU before pooling, `pool` as given."""

    pool: str = 'reduce'

    @nn.compact
    def __call__(self, x, train: bool = False):
        pool = (
            _window_reduce_pool
            if self.pool == 'reduce'
            else (lambda y: nn.max_pool(y, (2, 2), strides=(2, 2)))
        )
        conv, dense = self.masked_layers(kernel_size=(5, 5), padding='VALID')
        x = pool(nn.relu(conv(20)(x)))
        x = pool(nn.relu(conv(50)(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(dense(500)(x))
        return dense(self.num_classes)(x)


def variants(name: str) -> dict[str, tuple[nn.Module, bool]]:
    """label -> (model, YNNPACK on), each with im2col convolutions. The CPU defaults
    (`hardware.specialize`) are marked."""
    default = models.create_model(name, 10, backend='cpu')
    out = {}
    for layout in ('NHWC', 'CNHW'):
        for ynnpack in (True, False):
            mark = (
                ' (default)'
                if (layout, ynnpack) == (default.layout, default.xla_cpu_ynnpack)
                else ''
            )
            label = f'{layout}, YNNPACK {"on" if ynnpack else "off"}{mark}'
            out[label] = (default.clone(layout=layout), ynnpack)
    if name == 'lenet5':
        out['before: NHWC, relu->one 2x2 reduce, YNNPACK on'] = (
            EarlierLeNet5(conv_impl='im2col'),
            True,
        )
        out['before that: nn.max_pool, YNNPACK on'] = (
            EarlierLeNet5(conv_impl='im2col', pool='window'),
            True,
        )
    return out


def time_model(name: str, steps: int, repeats: int) -> dict[str, float]:
    image_shape, batch = MODELS[name]
    cfg = client_lib.LocalConfig(batch_size=batch, lr=0.001, th_coeff=0.002)
    variables = models.init_variables(models.MODELS[name](), jax.random.key(0), image_shape)
    state = client_lib.ClientState(
        variables['params'], variables['thresholds'], variables['batch_stats'], ()
    )
    opt = client_lib.make_optimizer(cfg).init((state.params, state.thresholds))
    xs = jax.random.normal(jax.random.key(1), (steps, batch, *image_shape))
    ys = jax.random.randint(jax.random.key(2), (steps, batch), 0, 10)
    fns = {}
    for label, (model, ynnpack) in variants(name).items():

        def one(s, o, x, y, model=model):
            return client_lib.local_step(
                model, cfg, s, o, x, y, jnp.bool_(True), lr=cfg.lr, penalty_coeff=cfg.th_coeff
            )[:2]

        looped = jax.jit(
            lambda s, o, xs, ys, one=one: jax.lax.fori_loop(
                0, steps, lambda i, c: one(*c, xs[i], ys[i]), (s, o)
            )[0],
            compiler_options=None if ynnpack else hardware.YNNPACK_OFF,
        )
        fns[label] = functools.partial(looped, state, opt, xs, ys)
    for f in fns.values():
        jax.block_until_ready(f())
    times = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved, so load changes hit every variant alike
        for k, f in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append((time.perf_counter() - start) / steps)
    return {k: float(np.median(v)) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default=','.join(MODELS))
    parser.add_argument('--steps', type=int, default=10, help='steps per compiled loop')
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    print(
        f'backend {jax.default_backend()}, {len(jax.devices())} device(s); one training step '
        f'inside a fori_loop, median of {args.repeats} x {args.steps} steps'
    )
    for name in args.models.split(','):
        times = time_model(name, args.steps, args.repeats)
        base = next(t for label, t in times.items() if label.startswith('NHWC, YNNPACK on'))
        print(f'{name} (batch {MODELS[name][1]})')
        for label, t in times.items():
            print(f'  {label:<48} {1e3 * t:8.2f} ms   x{base / t:.2f} vs NHWC, YNNPACK on')


if __name__ == '__main__':
    main()
