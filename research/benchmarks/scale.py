r"""Resident clients from 10^3 to 10^6: bytes per client, seconds per round and evaluation.

    python research/benchmarks/scale.py                        # digits CNN, 10^3 and 10^4
    python research/benchmarks/scale.py --clients=100000 --forms=lazy
    python research/benchmarks/scale.py --model=digits_mlp --clients=1000000 --forms=lazy
    python research/benchmarks/scale.py --tiers=device,host,disk --clients=1000,10000,100000
    python research/benchmarks/scale.py --tiers=disk --model=digits_mlp --clients=1000000

Every client keeps its own model between rounds, so the all-client state grows linearly with N. A
round trains the 10 sampled clients; the importance update (`all_after`) reaches all N, either
eagerly (every client's weights rewritten every round) or lazily (two numbers per client and row,
`server.lazy_importance_update`). An evaluated round tests a fixed panel of `--panel` clients; a full
sweep tests all N. Both forms run in the same process, one after the other, on the same data, so
their ratio is taken at the same moment. Synthetic data: `--examples` training and a fifth of that
for test per client, indices into a shared pool of images. Each N runs in its own process so that
resident memory is not shared.

`--tiers` measures where the clients live instead (spafl_jax/store.py), all with the lazy update:
'device' (the whole state on the device), 'host' (a host array) and 'disk' (tensorstore, one file per
client, under --disk_dir); each (N, tier) in its own process. Columns: the bytes a client takes in the
tier and on the device, the round (its host wait for the cohort's rows, and the worker's read and write
per round, which overlap the training), the panel evaluation, and resident memory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

SHAPES = {'digits_cnn': (8, 8, 1), 'digits_mlp': (8, 8, 1), 'lenet5': (28, 28, 1)}
POOL = 65_536  # distinct synthetic images the clients' indices point into


def rss_mib() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    return float('nan')


def _data(num_clients: int, examples: int, shape, seed: int):
    import numpy as np  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from spafl_jax import federated  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(seed)
    pool = min(POOL, num_clients * examples)
    return federated.ClientData(
        images=jnp.asarray(rng.integers(0, 256, (pool, *shape), dtype=np.uint8)),
        labels=jnp.asarray(rng.integers(0, 10, pool), jnp.int32),
        example_ids=jnp.asarray(rng.integers(0, pool, (num_clients, examples), dtype=np.int32)),
        counts=jnp.full((num_clients,), examples, jnp.int32),
    )


def one(args, num_clients: int) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from spafl_jax import client as client_lib  # pylint: disable=g-import-not-at-top
    from spafl_jax import execution, federated, models  # pylint: disable=g-import-not-at-top

    shape = SHAPES[args.model]
    base = rss_mib()
    train = _data(num_clients, args.examples, shape, 0)
    test = _data(num_clients, max(args.examples // 5, 4), shape, 1)
    model = models.create_model(args.model, 10)
    cfg = client_lib.LocalConfig(batch_size=16, local_epochs=1, lr=0.01, th_coeff=0.01)
    round_cfg = federated.RoundConfig(clients_per_round=10, importance_update='all_after')
    spec = client_lib.DataSpec(pixel_max=255.0, mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1])
    runner = execution.RoundRunner(model, cfg, round_cfg, spec, train, test, strategy=args.strategy)
    panel = np.sort(
        np.random.default_rng(2).choice(num_clients, min(args.panel, num_clients), replace=False)
    )
    row = {'clients': num_clients}
    for form in args.forms.split(','):
        start = time.perf_counter()
        state = federated.init_state(
            model,
            cfg,
            jax.random.key(0),
            num_clients=num_clients,
            image_shape=shape,
            lazy_importance=form == 'lazy',
        )
        state = runner.place_state(state)
        jax.block_until_ready(state)
        row[f'{form} init s'] = time.perf_counter() - start
        row['bytes/client'] = sum(x.nbytes for x in jax.tree.leaves(state.clients)) / num_clients
        row['state MiB'] = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
        times = []
        for r in range(args.rounds):
            sampled = np.sort(np.random.default_rng([1, r]).choice(num_clients, 10, replace=False))
            start = time.perf_counter()
            state, metrics = runner.run_round(state, sampled, jax.random.key(1))
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
        row[f'{form} round s'] = float(np.median(times[1:]))
        row[f'{form} 1st round s'] = times[0]
        if form == args.forms.split(',')[-1]:
            jax.block_until_ready(runner.evaluate_panel(state, panel))  # compiles
            start = time.perf_counter()
            jax.block_until_ready(runner.evaluate_panel(state, panel))
            row['panel eval s'] = time.perf_counter() - start
            if num_clients <= args.full_eval_max:
                jax.block_until_ready(runner.evaluate(state))
                start = time.perf_counter()
                jax.block_until_ready(runner.evaluate(state))
                row['full eval s'] = time.perf_counter() - start
        row['RSS+ MiB'] = rss_mib() - base
        del state
    print('ROW', repr(row), flush=True)


def one_tier(args, num_clients: int, tier: str) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from spafl_jax import client as client_lib  # pylint: disable=g-import-not-at-top
    from spafl_jax import execution, federated, models  # pylint: disable=g-import-not-at-top
    from spafl_jax import store as store_lib  # pylint: disable=g-import-not-at-top

    shape = SHAPES[args.model]
    base = rss_mib()
    train = _data(num_clients, args.examples, shape, 0)
    test = _data(num_clients, max(args.examples // 5, 4), shape, 1)
    model = models.create_model(args.model, 10)
    cfg = client_lib.LocalConfig(batch_size=16, local_epochs=1, lr=0.01, th_coeff=0.01)
    round_cfg = federated.RoundConfig(clients_per_round=10, importance_update='all_after')
    spec = client_lib.DataSpec(pixel_max=255.0, mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1])
    panel = np.sort(
        np.random.default_rng(2).choice(num_clients, min(args.panel, num_clients), replace=False)
    )
    row = {'clients': num_clients, 'tier': tier}
    start = time.perf_counter()
    if tier == 'device':
        runner = execution.RoundRunner(
            model, cfg, round_cfg, spec, train, test, strategy=args.strategy
        )
        state = runner.place_state(
            federated.init_state(
                model,
                cfg,
                jax.random.key(0),
                num_clients=num_clients,
                image_shape=shape,
                lazy_importance=True,
            )
        )
        row['device B/client'] = sum(x.nbytes for x in jax.tree.leaves(state.clients)) / num_clients
        row['tier B/client'] = row['device B/client']
        run = lambda state, r, sampled, following: runner.run_round(state, sampled, keys[r])
        panel_eval = lambda state: runner.evaluate_panel(state, panel)
    else:
        directory = os.path.join(args.disk_dir, f'{args.model}_{num_clients}')
        if tier == 'disk':
            import shutil  # pylint: disable=g-import-not-at-top

            shutil.rmtree(directory, ignore_errors=True)
        runner, state = store_lib.make_store_runner(
            model,
            cfg,
            round_cfg,
            spec,
            train,
            test,
            tier=tier,
            rng=jax.random.key(0),
            image_shape=shape,
            directory=directory,
            eval_clients=args.panel,
            strategy=args.strategy,
        )
        row['device B/client'] = sum(x.nbytes for x in jax.tree.leaves(state.clients)) / num_clients
        row['tier B/client'] = runner.layout.width * 4
        run = lambda state, r, sampled, following: runner.run_round(
            state, sampled, keys[r], following
        )
        panel_eval = lambda state: runner.evaluate_clients(state, panel)
    jax.block_until_ready(state)
    row['init s'] = time.perf_counter() - start
    keys = [jax.random.key(1)] * (args.rounds + 1)
    samples = [
        np.sort(np.random.default_rng([1, r]).choice(num_clients, 10, replace=False))
        for r in range(args.rounds + 1)
    ]
    times = []
    for r in range(args.rounds):
        if r == 1 and tier != 'device':
            runner.seconds = dict.fromkeys(runner.seconds, 0.0)  # round 0 compiles
        start = time.perf_counter()
        state, metrics = run(state, r, samples[r], samples[r + 1])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    row['round s'] = float(np.median(times[1:]))
    row['1st round s'] = times[0]
    if tier != 'device':
        runner.flush()
        for k, v in runner.seconds.items():
            row[f'{k} s'] = v / (args.rounds - 1)
    jax.block_until_ready(panel_eval(state))  # compiles
    start = time.perf_counter()
    jax.block_until_ready(panel_eval(state))
    row['panel eval s'] = time.perf_counter() - start
    if tier != 'device':
        row['stored MiB'] = runner.store.bytes_used() / 2**20
        runner.close()
    row['RSS+ MiB'] = rss_mib() - base
    print('ROW', repr(row), flush=True)


TIER_COLUMNS = (
    ('clients', '{:,}'),
    ('tier', '{}'),
    ('tier B/client', '{:,.0f}'),
    ('device B/client', '{:,.0f}'),
    ('round s', '{:.3f}'),
    ('wait s', '{:.3f}'),
    ('read s', '{:.3f}'),
    ('write s', '{:.3f}'),
    ('panel eval s', '{:.3f}'),
    ('stored MiB', '{:,.1f}'),
    ('RSS+ MiB', '{:,.0f}'),
    ('init s', '{:.1f}'),
)


COLUMNS = (
    ('clients', '{:,}'),
    ('bytes/client', '{:,.0f}'),
    ('state MiB', '{:,.0f}'),
    ('RSS+ MiB', '{:,.0f}'),
    ('eager round s', '{:.3f}'),
    ('lazy round s', '{:.3f}'),
    ('eager/lazy', '{:.1f}x'),
    ('panel eval s', '{:.3f}'),
    ('full eval s', '{:.2f}'),
    ('lazy init s', '{:.1f}'),
    ('lazy 1st round s', '{:.1f}'),
)


def markdown(rows, columns=COLUMNS) -> str:
    lines = ['| ' + ' | '.join(c for c, _ in columns) + ' |', '|' + '---|' * len(columns)]
    for row in rows:
        if 'eager round s' in row and 'lazy round s' in row:
            row['eager/lazy'] = row['eager round s'] / row['lazy round s']
        cells = [fmt.format(row[c]) if c in row else '–' for c, fmt in columns]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='digits_cnn', choices=sorted(SHAPES))
    parser.add_argument('--clients', default='1000,10000')
    parser.add_argument('--forms', default='eager,lazy', help='eager,lazy | lazy | eager')
    parser.add_argument('--examples', type=int, default=32)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--panel', type=int, default=1000)
    parser.add_argument('--full_eval_max', type=int, default=10_000)
    parser.add_argument('--strategy', default='auto')
    parser.add_argument('--tiers', default='', help='device,host,disk: the client store tiers')
    parser.add_argument('--disk_dir', default='/tmp/spafl_scale_store')
    parser.add_argument('--child', type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument('--child_tier', default='', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child_tier:
            one_tier(args, args.child, args.child_tier)
        else:
            one(args, args.child)
        return
    rows = []
    tiers = args.tiers.split(',') if args.tiers else ['']
    given = [
        a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith('--clients')
    ]
    child = [a for a in given if not a.startswith('--tiers')]
    for n in args.clients.split(','):
        for tier in tiers:
            out = subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    *child,
                    f'--child={n}',
                    *([f'--child_tier={tier}'] if tier else []),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            row = next(line for line in out.splitlines() if line.startswith('ROW '))
            rows.append(eval(row[4:]))  # noqa: S307
            print(f'{args.model}: {int(n):,} clients {tier} done', flush=True)
    print(markdown(rows, TIER_COLUMNS if args.tiers else COLUMNS))


if __name__ == '__main__':
    main()
