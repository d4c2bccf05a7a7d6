r"""Runs our library on the exact draws of an official learning curve: a paired comparison.

`record_official.py curve --draws=DRAWS.npz` runs the official FMNIST folder unchanged on the real
data and records what it drew: the split, the initial model, the sampled clients of every round,
the order of every local batch, and every client's test accuracy and density. This script feeds
the same initial model, split, clients and batches through our library in float32, as the official
code computes (client.local_step, server.aggregate, server.importance_update and our evaluation,
driven by tests/reference/replay.py, the engine that replays the golden traces in
tests/test_reference.py), and writes our curve next to the official one. With every draw shared,
what is left between the two curves is how the two float32 programs round (they drift apart, most
at ReLU kinks and collapse resets), plus any difference the golden traces miss, instead of the
seed-to-seed spread of the split and the initial model, which on this workload is larger than the
effects being looked for.

    /tmp/torch/bin/python research/official/record_official.py curve \
        --official=/tmp/spafl_official --rounds=100 --seed=1 --out=/tmp/official_seed1 \
        --draws=/tmp/draws_seed1.npz
    python research/official/replay_curve.py --draws=/tmp/draws_seed1.npz \
        --out=research/results/fmnist_official_paired_seed1

A control for the rounding: the same replay under
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` (XLA:CPU's own dot kernels instead of YNNPACK's:
the same arithmetic, rounded differently) or with `--conv_impl=xla` gives a second curve of ours on
the same draws; how far it moves from the first is how far float rounding alone moves a curve here.

The output directory receives `metrics.jsonl` (our curve: round, accuracy, density, and the
official ones from the draws as `official_accuracy` and `official_density`; per masked layer the
mean kept fraction and the collapse resets summed over clients, ours and, where the draws hold them,
the official ones) and `config.json`. `--per_client=FILE.npz` keeps the same per client and round,
to find where the two runs part.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)  # no install needed
sys.path.insert(0, os.path.join(REPO, 'tests', 'reference'))  # the replay engine of the traces

from spafl_jax import data as data_lib  # pylint: disable=wrong-import-position
from spafl_jax import files  # pylint: disable=wrong-import-position
from spafl_jax import server  # pylint: disable=wrong-import-position
import replay as replay_engine  # pylint: disable=wrong-import-position,import-error


def load_draws(path: str, data_dir: str | None) -> tuple[dict, dict]:
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays.pop('meta')))
    meta['settings']['comm_rounds'] = meta['rounds_recorded']
    fmnist = data_lib.load_fashion_mnist_idx(data_dir or meta['data'])
    arrays['train_images'], arrays['train_labels'] = (
        fmnist.train_images[..., 0],
        fmnist.train_labels,
    )
    arrays['test_images'], arrays['test_labels'] = fmnist.test_images[..., 0], fmnist.test_labels
    return meta, arrays


def _official_resets(arrays: dict, r: int, k: int, layers: int) -> np.ndarray | None:
    """Client k's official reset counts after round r's test (None: not recorded)."""
    if r < 0:
        return np.zeros(layers, np.int64)
    key = f'r{r}/tested/{k}/resets'
    return arrays[key].astype(np.int64) if key in arrays else None


def _force_resets(rp, k: int, missing: np.ndarray) -> None:
    """Client k's thresholds of the layers where `missing` > 0 set to 0, as a reset leaves them."""
    leaves, treedef = jax.tree.flatten(rp.clients[k].thresholds)
    leaves = [jnp.zeros_like(t) if m > 0 else t for t, m in zip(leaves, missing)]
    rp.clients[k] = rp.clients[k].replace(thresholds=jax.tree.unflatten(treedef, leaves))


def _perturb(rp, seed: int) -> None:
    """Every initial weight moved by one unit in the last place, up or down at random (seeded):
    a perturbation as small as float32 rounding, to see how far it alone moves a curve."""
    rng = np.random.default_rng(seed)

    def one(x):
        x = np.asarray(x)
        away = np.where(rng.random(x.shape) < 0.5, np.inf, -np.inf).astype(x.dtype)
        return jnp.asarray(np.nextafter(x, away))

    params = jax.tree.map(one, rp.clients[0].params)
    rp.clients = [c.replace(params=params) for c in rp.clients]


def replay(
    meta: dict,
    arrays: dict,
    out: str,
    rounds: int | None,
    conv_impl: str = 'im2col',
    per_client: str | None = None,
    follow_official_resets: bool = False,
    perturb_seed: int | None = None,
    float64: bool = False,
) -> None:
    with jax.enable_x64(float64):
        _replay(
            meta,
            arrays,
            out,
            rounds,
            conv_impl,
            per_client,
            follow_official_resets,
            perturb_seed,
            jnp.float64 if float64 else jnp.float32,
        )


def _replay(
    meta, arrays, out, rounds, conv_impl, per_client, follow_official_resets, perturb_seed, dtype
) -> None:
    rp = replay_engine.Replay((meta, arrays), dtype=dtype, conv_impl=conv_impl)
    if perturb_seed is not None:
        _perturb(rp, perturb_seed)
    rounds = min(rounds or rp.rounds, rp.rounds)
    os.makedirs(out, exist_ok=True)
    files.write_atomic(
        os.path.join(out, 'config.json'),
        json.dumps(
            {
                'code': 'spafl_jax on the draws of an official curve '
                '(research/official/replay_curve.py)',
                'official_settings': meta['settings'],
                'rounds': rounds,
                'dtype': np.dtype(dtype).name,
                'official_dtype': meta.get('dtype', 'float32'),
                'conv_impl': conv_impl,
                'xla_flags': os.environ.get('XLA_FLAGS', ''),
                'follow_official_resets': follow_official_resets,
                'perturb_seed': perturb_seed,
            },
            indent=1,
        ).encode(),
    )
    records, history = [], {}
    layers = len(rp.names)
    forced = np.zeros((rp.num_clients, layers), np.int64)

    def follow(k: int, r: int, ours_before: np.ndarray) -> None:
        # A collapse reset the official run had in round r and ours did not: made ours.
        after, before = (_official_resets(arrays, r_, k, layers) for r_ in (r, r - 1))
        if after is None or before is None:  # drawn by a recorder without per-layer records
            return
        theirs = after - before
        missing = theirs - (rp.resets[k] - ours_before) - forced_this_round[k]
        if np.any(missing > 0):
            _force_resets(rp, k, missing)
            forced[k] += np.maximum(missing, 0)
            forced_this_round[k] += np.maximum(missing, 0)

    for r in range(rounds):
        start = time.time()
        sampled = arrays[f'r{r}/sampled']
        for k in sampled:  # broadcast, and FMNIST's importance update before training
            rp.clients[k] = rp.clients[k].replace(thresholds=rp.server_thresholds)
            if rp.importance == 'sampled_before' and r > 0:
                rp.importance_update(k, rp.delta)
        before_round = rp.resets.copy()
        forced_this_round = np.zeros_like(forced)
        for k in sampled:
            rp.train(k, arrays[f'r{r}/order/{k}'], r)
            if follow_official_resets:  # before aggregation: the server receives the reset
                follow(k, r, before_round[k])
        new_global = server.aggregate(
            jax.tree.map(lambda *t: jnp.stack(t), *[rp.clients[k].thresholds for k in sampled])
        )
        rp.delta = jax.tree.map(jnp.subtract, new_global, rp.server_thresholds)
        rp.server_thresholds = new_global
        if rp.importance == 'all_after':
            for k in range(rp.num_clients):
                rp.importance_update(k, rp.delta)
        tested, layer_density = [], []
        for k in range(rp.num_clients):
            tested.append(rp.test(k))
            layer_density.append(rp.layer_density)
            if follow_official_resets:  # a reset at test: the mask is the reset one from now on
                follow(k, r, before_round[k])
        official_global = [arrays[f'r{r}/global/{name}.threshold'] for name in rp.names]
        threshold_difference = float(
            np.mean(
                np.concatenate(
                    [
                        np.abs(np.asarray(ours) - theirs).ravel()
                        for ours, theirs in zip(
                            jax.tree.leaves(rp.server_thresholds), official_global
                        )
                    ]
                )
            )
        )
        official = [
            (float(arrays[f'r{r}/tested/{k}/accuracy']), float(arrays[f'r{r}/tested/{k}/density']))
            for k in range(rp.num_clients)
        ]
        round_history = {
            'accuracy': np.asarray(tested)[:, 0],
            'layer_density': layer_density,
            'resets': rp.resets.copy(),
            'official_accuracy': np.asarray(official)[:, 0],
        }
        accuracy, density = np.mean(tested, axis=0)
        official_accuracy, official_density = np.mean(official, axis=0)
        differences = np.abs(np.asarray(tested) - np.asarray(official))
        records.append(
            {
                'round': r + 1,
                'accuracy': round(accuracy / 100.0, 6),
                'density': round(density, 6),
                'official_accuracy': round(official_accuracy / 100.0, 6),
                'official_density': round(official_density, 6),
                'clients_equal_accuracy': int(np.sum(differences[:, 0] < 1e-3)),
                'max_client_accuracy_difference': round(float(differences[:, 0].max()) / 100.0, 6),
                'layer_density': [round(float(x), 6) for x in np.mean(layer_density, axis=0)],
                'resets': rp.resets.sum(axis=0).tolist(),
                'server_threshold_difference': threshold_difference,
            }
        )
        if follow_official_resets:
            records[-1]['forced_resets'] = forced.sum(axis=0).tolist()
        if f'r{r}/tested/0/resets' in arrays:  # drawn by a recorder that keeps per-layer records
            theirs = {
                what: np.stack([arrays[f'r{r}/tested/{k}/{what}'] for k in range(rp.num_clients)])
                for what in ('layer_density', 'resets')
            }
            round_history.update({f'official_{w}': v for w, v in theirs.items()})
            records[-1].update(
                {
                    'official_layer_density': [
                        round(float(x), 6) for x in theirs['layer_density'].mean(axis=0)
                    ],
                    'official_resets': theirs['resets'].sum(axis=0).tolist(),
                    'clients_equal_resets': int(
                        np.sum(np.all(theirs['resets'] == rp.resets, axis=1))
                    ),
                }
            )
        for what, value in round_history.items():
            history.setdefault(what, []).append(np.asarray(value))
        if per_client:
            np.savez_compressed(
                per_client,
                layers=np.asarray(rp.names),
                **{w: np.stack(v) for w, v in history.items()},
            )
        files.write_atomic(
            os.path.join(out, 'metrics.jsonl'),
            ''.join(json.dumps(x) + '\n' for x in records).encode(),
        )
        print(
            f'round {r + 1}/{rounds}: accuracy {accuracy:.2f} % (official '
            f'{official_accuracy:.2f}), density {density:.3f} (official {official_density:.3f}), '
            f'{records[-1]["clients_equal_accuracy"]} clients equal, resets '
            f'{records[-1]["resets"]} (official {records[-1].get("official_resets", "-")}), '
            f'{time.time() - start:.1f} s',
            flush=True,
        )


DRAWN = ('split/', '/sampled', '/order/', 'initial/')  # what a run drew, as opposed to computed


def rescore(draws: str, against: str, out: str) -> None:
    """Compares the replay in `out` (its metrics.jsonl and --per_client file `out/per_client.npz`)
    with the official run that recorded `against` instead of `draws`, after checking that the two
    official runs drew exactly the same (as a float32 and a float64 run of one seed do): rewrites
    the official_* fields and the per-client comparison (dropping the server-threshold gap, which
    was measured against the replayed run), and keeps the official per-client
    accuracy, layer density and resets of `against` in per_client.npz."""
    with np.load(draws) as a, np.load(against) as b:
        meta = json.loads(str(b['meta']))
        recorded = lambda k: (
            not k.startswith('r') or int(k[1 : k.index('/')]) < meta['rounds_recorded']
        )
        drawn = [k for k in a.files if any(d in k for d in DRAWN) and recorded(k)]
        missing = [k for k in drawn if k not in b.files]
        differ = [k for k in drawn if k in b.files and not np.array_equal(a[k], b[k])]
        if missing or differ:
            raise SystemExit(
                f'error: {against} did not draw what {draws} drew: '
                f'{len(missing)} draws missing, {len(differ)} different '
                f'(first: {(missing + differ)[0]}).'
            )
        theirs = {k: b[k] for k in b.files if '/tested/' in k}
    path = os.path.join(out, 'per_client.npz')
    with np.load(path) as f:
        ours = {k: f[k] for k in f.files}
    records = [json.loads(line) for line in open(os.path.join(out, 'metrics.jsonl'))]
    rounds = min(len(records), meta['rounds_recorded'])
    clients = ours['accuracy'].shape[1]
    official = {
        what: np.stack(
            [
                np.stack([theirs[f'r{r}/tested/{k}/{what}'] for k in range(clients)])
                for r in range(rounds)
            ]
        )
        for what in ('accuracy', 'density', 'layer_density', 'resets')
    }
    for r, record in enumerate(records[:rounds]):
        record.pop('server_threshold_difference', None)  # measured against the other run
        differences = np.abs(ours['accuracy'][r] - official['accuracy'][r])
        record.update(
            {
                'official_accuracy': round(float(official['accuracy'][r].mean()) / 100.0, 6),
                'official_density': round(float(official['density'][r].mean()), 6),
                'clients_equal_accuracy': int(np.sum(differences < 1e-3)),
                'max_client_accuracy_difference': round(float(differences.max()) / 100.0, 6),
                'official_layer_density': [
                    round(float(x), 6) for x in official['layer_density'][r].mean(axis=0)
                ],
                'official_resets': official['resets'][r].sum(axis=0).tolist(),
                'clients_equal_resets': int(
                    np.sum(np.all(official['resets'][r] == ours['resets'][r], axis=1))
                ),
            }
        )
    files.write_atomic(
        os.path.join(out, 'metrics.jsonl'),
        ''.join(json.dumps(x) + '\n' for x in records[:rounds]).encode(),
    )
    ours.update({f'official_{w}': official[w] for w in ('accuracy', 'layer_density', 'resets')})
    ours = {k: (v[:rounds] if v.ndim and k != 'layers' else v) for k, v in ours.items()}
    np.savez_compressed(path, **ours)
    config_path = os.path.join(out, 'config.json')
    config = json.load(open(config_path))
    config.update(
        {
            'official_dtype': meta.get('dtype', 'float32'),
            'rescored_against': 'the draws of an official run that drew the same '
            f'(dtype {meta.get("dtype", "float32")})',
        }
    )
    files.write_atomic(config_path, json.dumps(config, indent=1).encode())
    print(f'rescored {rounds} rounds of {out} against {against}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--draws', required=True, help='.npz written by record_official.py curve')
    parser.add_argument('--out', required=True, help='directory for metrics.jsonl and config.json')
    parser.add_argument(
        '--data', default=None, help='Fashion-MNIST IDX files (default: as recorded)'
    )
    parser.add_argument('--rounds', type=int, default=None, help='stop after this many rounds')
    parser.add_argument(
        '--conv_impl',
        default='im2col',
        choices=('im2col', 'xla'),
        help="our convolutions: the same numbers up to float rounding, so 'xla' "
        'against the default measures how far rounding alone moves a curve',
    )
    parser.add_argument(
        '--per_client',
        default=None,
        help="also write every client's accuracy, layer densities and reset counts "
        'after every round, ours and official, to this .npz',
    )
    parser.add_argument(
        '--follow_official_resets',
        action='store_true',
        help='where the official run reset a collapsed layer and ours did not, '
        "reset ours too (after the client's training, or after its test): "
        'how far the curves part because of that discrete event alone',
    )
    parser.add_argument(
        '--perturb_seed',
        type=int,
        default=None,
        help='move every initial weight by one unit in the last place (up or '
        'down, drawn from this seed): an ensemble of such replays shows how '
        'far rounding-sized differences alone move the curve',
    )
    parser.add_argument(
        '--float64',
        action='store_true',
        help='run ours in float64, against an official curve recorded with '
        '--float64 (the same draws as float32 for the same seed): rounding '
        '2^29 times finer, so that only a difference in what is computed '
        'can part the curves early',
    )
    parser.add_argument(
        '--rescore_against',
        default=None,
        help='do not replay: compare the replay already in --out (run with '
        '--per_client=OUT/per_client.npz) with the official run that wrote '
        'these draws, after checking it drew exactly what --draws holds',
    )
    args = parser.parse_args()
    if args.rescore_against:
        rescore(args.draws, args.rescore_against, args.out)
        return
    meta, arrays = load_draws(args.draws, args.data)
    replay(
        meta,
        arrays,
        args.out,
        args.rounds,
        args.conv_impl,
        args.per_client,
        args.follow_official_resets,
        args.perturb_seed,
        args.float64,
    )


if __name__ == '__main__':
    main()
