r"""Memory and seconds per round as the number of resident clients grows: 100 -> 1,000 -> 10,000.

    python experiments/benchmarks/scale.py
    python experiments/benchmarks/scale.py --model=lenet5 --clients=100,1000

Every client keeps its own model between rounds, so the all-client state grows linearly with N; a
round trains 10 sampled clients but applies the importance update to all N, and an evaluation runs
every client's model on its own test examples. Synthetic data (`--examples` training and a fifth of
that for test per client). Each N runs in its own process so resident memory is not shared.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

SHAPES = {'digits_cnn': (8, 8, 1), 'lenet5': (28, 28, 1), 'conv4': (32, 32, 3)}


def rss_mib() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    return float('nan')


def one(model_name: str, num_clients: int, examples: int, rounds: int, strategy: str) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np
    from spafl_jax import client as client_lib, execution, federated, models

    shape = SHAPES[model_name]
    batch = 16
    base = rss_mib()
    rng = np.random.default_rng(0)
    n_test = max(examples // 5, 4)
    images = rng.integers(0, 256, (num_clients * examples, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, num_clients * examples)
    train_ids = np.arange(num_clients * examples).reshape(num_clients, examples)
    test_ids = np.arange(num_clients * n_test).reshape(num_clients, n_test)
    train = federated.make_client_data(images, labels, list(train_ids))
    test = federated.make_client_data(
        images[: num_clients * n_test], labels[: num_clients * n_test], list(test_ids)
    )
    model = models.create_model(model_name, 10)
    cfg = client_lib.LocalConfig(batch_size=batch, local_epochs=1, lr=0.01)
    round_cfg = federated.RoundConfig(clients_per_round=10)
    spec = client_lib.DataSpec(pixel_max=255.0, mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1])
    state = federated.init_state(
        model, cfg, jax.random.key(0), num_clients=num_clients, image_shape=shape
    )
    state_mib = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    runner = execution.RoundRunner(model, cfg, round_cfg, spec, train, test, strategy=strategy)
    times = []
    for r in range(rounds):
        sampled = np.sort(np.random.default_rng([1, r]).choice(num_clients, 10, replace=False))
        start = time.perf_counter()
        state, metrics = runner.run_round(state, sampled, jax.random.key(1))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(runner.evaluate(state))
    runner_eval_first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(runner.evaluate(state))
    eval_s = time.perf_counter() - start
    print(
        f'{model_name:<10} {num_clients:>7} {state_mib:10.1f} {rss_mib() - base:9.0f} '
        f'{float(np.median(times[1:])):9.3f} {eval_s:8.3f} {times[0]:9.1f} '
        f'{runner_eval_first:8.1f}',
        flush=True,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='digits_cnn')
    parser.add_argument('--clients', default='100,1000,10000')
    parser.add_argument('--examples', type=int, default=32)
    parser.add_argument('--rounds', type=int, default=4)
    parser.add_argument('--strategy', default='auto')
    parser.add_argument('--child', type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        one(args.model, args.child, args.examples, args.rounds, args.strategy)
        return
    print(
        f'{"model":<10} {"clients":>7} {"state MiB":>10} {"RSS+ MiB":>9} {"s/round":>9} '
        f'{"eval s":>8} {"1st round":>9} {"1st eval":>8}',
        flush=True,
    )
    for n in args.clients.split(','):
        subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                f'--model={args.model}',
                f'--examples={args.examples}',
                f'--rounds={args.rounds}',
                f'--strategy={args.strategy}',
                f'--child={n}',
            ],
            check=True,
        )


if __name__ == '__main__':
    main()
