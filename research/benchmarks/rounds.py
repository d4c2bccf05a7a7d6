r"""Seconds per SpaFL round for every execution strategy and model, as ratios measured in one run.

    python research/benchmarks/rounds.py
    python research/benchmarks/rounds.py --models=lenet5 --rounds=4 --strategies=map,vmap

Synthetic data of each model's shape; client sizes from a Dirichlet(alpha) split (alpha = 0.1 by
default, as the official CIFAR folders) scaled to `--mean_examples` per client; 10 sampled clients of
`--num_clients`. Against, in the same process: a plain Python loop of a jitted single-client step
(`client.local_step` under `hardware.jit`, batches gathered eagerly, one device) over the same real
steps, the reference round (`federated.run_round`: clients vmapped, each lane running to the longest
client's steps), and a jitted 2048x2048 float32 matmul for the achievable GFLOP/s. Every figure
is the median of the steady rounds (the first one compiles); the machine is shared, so read the
ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from spafl_jax import algorithm as algorithm_lib
from spafl_jax import client as client_lib
from spafl_jax import data as data_lib
from spafl_jax import execution
from spafl_jax import federated
from spafl_jax import models
from spafl_jax import hardware

# model -> (image shape, official batch size, local epochs used here)
MODELS = {
    'digits_cnn': ((8, 8, 1), 16, 2),
    'lenet5': ((28, 28, 1), 64, 1),
    'conv4': ((32, 32, 3), 16, 1),
}


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / np.median(times) / 1e9


def client_sizes(
    num_clients: int, mean_examples: int, alpha: float, batch: int, seed: int = 0
) -> np.ndarray:
    """Training-set sizes of a Dirichlet(alpha) split of 500 examples per client (the CIFAR-10
    setting), rescaled to `mean_examples` on average and at least one batch."""
    labels = np.repeat(np.arange(10), num_clients * 50)
    train_ids, _ = data_lib.dirichlet_split(
        labels, labels[:num_clients], num_clients, alpha=alpha, min_train_examples=16, seed=seed
    )
    sizes = np.array([len(ids) for ids in train_ids]) * mean_examples / 500
    return np.maximum(np.round(sizes).astype(int), batch)


def synthetic_split(num_clients: int, mean_examples: int, alpha: float, batch: int, seed: int = 0):
    """Consecutive index blocks of those sizes, and a test set of a fifth of that (at least 4)."""
    sizes = client_sizes(num_clients, mean_examples, alpha, batch, seed)
    test_sizes = np.maximum(sizes // 5, 4)
    bounds, test_bounds = np.cumsum(sizes), np.cumsum(test_sizes)
    train_ids = np.split(np.arange(bounds[-1]), bounds[:-1])
    test_ids = np.split(np.arange(test_bounds[-1]), test_bounds[:-1])
    labels = np.random.default_rng(seed).integers(0, 10, bounds[-1])
    return labels, train_ids, test_ids


def python_loop_round(model, cfg, spec, state, data, sampled, seed_key, r):
    """The in-run baseline: a Python loop of one jitted client step over the same real steps."""
    step = python_loop_round.step
    for c in sampled:
        client = jax.tree.map(lambda x: x[c], state.clients)
        opt = client_lib.make_optimizer(cfg).init((client.params, client.thresholds))
        key = algorithm_lib.client_keys(seed_key, r, jnp.asarray([c]))[0]
        batches = python_loop_round.schedule(key, data.counts[c])
        per_epoch = int(python_loop_round.counts[c]) // cfg.batch_size
        stride = data.example_ids.shape[1] // cfg.batch_size
        for e in range(cfg.local_epochs):
            for s in range(per_epoch):
                ids = data.example_ids[c][batches[e * stride + s]]
                client, opt = step(client, opt, data.images[ids], data.labels[ids])
    return client


def measure(fn, rounds: int):
    times = []
    for r in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn(r))
        times.append(time.perf_counter() - start)
    return times[0], float(np.median(times[1:]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default='digits_cnn,lenet5,conv4')
    parser.add_argument('--strategies', default='map,vmap')
    parser.add_argument('--rounds', type=int, default=4)
    parser.add_argument('--num_clients', type=int, default=100)
    parser.add_argument('--clients_per_round', type=int, default=10)
    parser.add_argument('--mean_examples', type=int, default=96)
    parser.add_argument('--alpha', type=float, default=0.1)
    parser.add_argument('--vmap_lanes', type=int, default=0)
    parser.add_argument(
        '--conv_impls', default='auto', help='auto | im2col | xla, comma-separated: each is timed'
    )
    parser.add_argument('--local_epochs', type=int, default=0, help='0: the table above')
    parser.add_argument(
        '--padded_scan',
        default='digits_cnn,lenet5',
        help='models for which the reference federated.run_round is timed too',
    )
    parser.add_argument(
        '--num_cpu_devices',
        type=int,
        default=execution.AUTO_CPU_DEVICES,
        help='as config.num_cpu_devices: -1 one per core (the default), 0 one',
    )
    args = parser.parse_args(argv)
    execution.initialize_runtime(
        num_cpu_devices=args.num_cpu_devices, clients_per_round=args.clients_per_round
    )

    peak = matmul_gflops()
    print(
        f'backend {jax.default_backend()}, {len(jax.devices())} device(s), '
        f'{os.cpu_count()} CPUs; jitted 2048^3 float32 matmul: {peak:.0f} GFLOP/s'
    )
    header = (
        f'{"model":<16} {"strategy":<12} {"s/round":>8} {"x loop":>7} {"examples/s":>10} '
        f'{"GFLOP/s":>8} {"% matmul":>8} {"compile s":>9} {"useful":>6}'
    )
    print(header)
    for name, conv_impl in [
        (m, c) for m in args.models.split(',') for c in args.conv_impls.split(',')
    ]:
        shape, batch, epochs = MODELS[name]
        epochs = args.local_epochs or epochs
        labels, train_ids, test_ids = synthetic_split(
            args.num_clients, args.mean_examples, args.alpha, batch
        )
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (len(labels), *shape), dtype=np.uint8)
        train = federated.make_client_data(images, labels, train_ids)
        test = federated.make_client_data(
            images[: len(np.concatenate(test_ids))],
            labels[: len(np.concatenate(test_ids))],
            test_ids,
        )
        model = models.create_model(name, 10, conv_impl=conv_impl)
        if conv_impl != 'auto':
            name = f'{name}/{conv_impl}'
        cfg = client_lib.LocalConfig(batch_size=batch, local_epochs=epochs, lr=0.01, th_coeff=1e-4)
        round_cfg = federated.RoundConfig(clients_per_round=args.clients_per_round)
        spec = client_lib.DataSpec(
            pixel_max=255.0, mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1]
        )
        initial = federated.init_state(
            model, cfg, jax.random.key(1), num_clients=args.num_clients, image_shape=shape
        )
        variables = {
            'params': jax.tree.map(lambda x: x[0], initial.clients.params),
            'thresholds': jax.tree.map(lambda x: x[0], initial.clients.thresholds),
            'batch_stats': jax.tree.map(lambda x: x[0], initial.clients.batch_stats),
        }
        macs = federated.layer_macs(model, variables, shape)
        flops_per_step = 6.0 * batch * sum(jax.tree.leaves(macs))  # fwd 2/MAC, bwd 4/MAC
        counts = np.asarray(train.counts)
        seed_key = jax.random.key(2)
        samples = [
            np.sort(
                np.random.default_rng([3, r]).choice(
                    args.num_clients, args.clients_per_round, replace=False
                )
            )
            for r in range(args.rounds)
        ]
        real_steps = [int((counts[s] // batch).sum()) * epochs for s in samples]
        steps = float(np.median(real_steps[1:]))

        python_loop_round.counts = counts
        python_loop_round.schedule = jax.jit(
            lambda key, count: client_lib.local_schedule(
                cfg, key, count, train.example_ids.shape[1]
            )[0]
        )
        # The model's compiler options (`hardware.jit`), so that `x loop` measures the execution only.
        python_loop_round.step = hardware.jit(
            lambda c, o, x, y: client_lib.local_step(
                model,
                cfg,
                c,
                o,
                client_lib.preprocess(spec, x),
                y,
                jnp.bool_(True),
                lr=cfg.lr,
                penalty_coeff=cfg.th_coeff,
            )[:2],
            model=model,
        )
        state = jax.tree.map(jnp.copy, initial)
        first, base = measure(
            lambda r: python_loop_round(model, cfg, spec, state, train, samples[r], seed_key, r),
            args.rounds,
        )

        def row(label, seconds, compile_s, useful):
            print(
                f'{name:<16} {label:<12} {seconds:8.3f} {base / seconds:7.2f} '
                f'{steps * batch / seconds:10.0f} {steps * flops_per_step / seconds / 1e9:8.1f} '
                f'{100 * steps * flops_per_step / seconds / 1e9 / peak:8.1f} {compile_s:9.1f} '
                f'{useful:6.2f}',
                flush=True,
            )

        row('python loop', base, first - base, 1.0)
        for strategy in args.strategies.split(','):
            runner = execution.RoundRunner(
                model,
                cfg,
                round_cfg,
                spec,
                train,
                test,
                strategy=strategy,
                lanes=args.vmap_lanes,
                macs=macs,
            )
            holder = {'state': jax.tree.map(jnp.copy, initial), 'useful': []}

            def one_round(r):
                holder['state'], m = runner.run_round(holder['state'], samples[r], seed_key)
                holder['useful'].append(m)
                return m

            first, seconds = measure(one_round, args.rounds)
            useful = [float(m['local_steps']) / float(m['max_steps']) for m in holder['useful']]
            row(strategy, seconds, first - seconds, float(np.mean(useful)))
            eval_first, eval_s = measure(lambda r: runner.evaluate(holder['state']), 3)
            print(
                f'{name:<16} {"  evaluate":<12} {eval_s:8.3f}  ({args.num_clients} clients, '
                f'{int(np.asarray(test.counts).sum())} examples; compile {eval_first - eval_s:.1f} s)'
            )
        if name.split('/')[0] in args.padded_scan.split(','):
            round_fn = federated.make_round_fn(model, cfg, round_cfg, spec, macs=macs)
            holder = {'state': jax.tree.map(jnp.copy, initial), 'metrics': []}

            def padded(r):
                holder['state'], m = round_fn(
                    holder['state'], train, jnp.asarray(samples[r]), seed_key
                )
                holder['metrics'].append(m)
                return m

            first, seconds = measure(padded, args.rounds)
            # Under vmap every lane runs as many steps as the round's longest client.
            lane_steps = [
                (counts[np.asarray(samples[r])] // batch) * epochs
                for r in range(len(holder['metrics']))
            ]
            useful = np.mean([s.sum() / max(s.max() * len(s), 1) for s in lane_steps])
            row('run_round', seconds, first - seconds, useful)
            eval_fn = federated.make_eval_fn(model, spec, batch_size=256)
            eval_first, eval_s = measure(lambda r: eval_fn(holder['state'].clients, test), 3)
            print(
                f'{name:<16} {"  evaluate":<12} {eval_s:8.3f}  (federated.evaluate, batch 256; '
                f'compile {eval_first - eval_s:.1f} s)'
            )


if __name__ == '__main__':
    main()
