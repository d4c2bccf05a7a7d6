r"""Our official-FMNIST preset against the official PyTorch code, from the runs' compact records.

    python research/fidelity.py                 # --results=research/results, the default

reads `<results>/official_fmnist_seed<k>/metrics.jsonl` (the official code, recorded by
research/official/record_official.py) and `<results>/fmnist_official_seed<k>/metrics.jsonl` (ours:
`python experiments/main.py --config=fmnist.py:official --config.rounds=200 --config.seed=<k>`), prints
accuracy and density of both codes at the chosen rounds, per seed and as the mean over the seeds
both codes reached, and draws both curves in one figure (`<results>/fidelity_fmnist.png`).

Records of ours with the collapse reset checked on the mask about to be used
(`<results>/fmnist_official_current_seed<k>/`, `--config.collapse_check=current`), where present,
get a table and curves of their own: what the official timing of that reset changes.

Paired records (`<results>/fmnist_official_paired_seed<k>/`, written by
research/official/replay_curve.py: our library run on the official run's own split, initial model,
sampled clients and batch orders) get a table, a summary of how far the paired curves are apart
against how far the official code's own seeds are, and a figure of their own
(`<results>/fidelity_fmnist_paired.png`).

The diagnosis of seed 1 (`<results>/fidelity_diagnosis_seed1/<variant>/`, each written by
replay_curve.py on the same draws, with per-layer densities and collapse resets, ours and official):
'ours', 'rounding' (XLA's dot kernels instead of YNNPACK's), 'perturb<k>' (every initial weight
moved by one unit in the last place, `--perturb_seed=k`) form an ensemble of rounding-sized
differences; 'follow' resets a collapsed layer wherever the official run did and ours did not
(`--follow_official_resets`). It gets a table, a summary and `<results>/fidelity_fmnist_diagnosis.png`.

At full length (`<results>/official_fmnist500_seed<k>/`, the official code for 500 rounds), the
official code is set against our `fmnist.py` default (the comparison's SpaFL records,
`<results>/compare_fmnist500/spafl/seed<k>/`) and the default with the importance update off (the
ablation's, `<results>/ablation_fmnist500/long_tailed__none/seed<k>/`): accuracy and density along
the run, the best accuracy and how far the last round falls below it, written to
`<results>/full_length_fmnist.md` (included in RESULTS.md) and drawn in
`<results>/full_length_fmnist.png`.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # no install needed

from spafl_jax import files  # pylint: disable=g-import-not-at-top,wrong-import-position

_RESULTS = flags.DEFINE_string('results', 'research/results', 'Folder of the compact run records.')
_SEEDS = flags.DEFINE_list('seeds', ['1', '2'], 'Seeds to compare.')
_ROUNDS = flags.DEFINE_list('rounds', ['50', '100', '200'], 'Rounds of the table.')
_OUT = flags.DEFINE_string('out', '', 'Figure path; default <results>/fidelity_fmnist.png.')

CODES = (
    ('official', 'official_fmnist_seed{}', 'official PyTorch code'),
    ('ours', 'fmnist_official_seed{}', 'spafl_jax fmnist.py:official'),
    (
        'current',
        'fmnist_official_current_seed{}',
        'spafl_jax fmnist.py:official, collapse_check=current',
    ),
    ('paired', 'fmnist_official_paired_seed{}', 'spafl_jax on the official draws'),
    (
        'rounding',
        'fmnist_official_paired_rounding_seed{}',
        'the same, rounded differently (YNNPACK off)',
    ),
)


# The official code at 500 rounds against our own defaults: (code, record folder, label).
FULL_LENGTH = (
    ('official', 'official_fmnist500_seed{}', 'official PyTorch code (its FMNIST folder)'),
    ('default', os.path.join('compare_fmnist500', 'spafl', 'seed{}'), 'spafl_jax fmnist.py'),
    (
        'no_update',
        os.path.join('ablation_fmnist500', 'long_tailed__none', 'seed{}'),
        'spafl_jax fmnist.py, importance_update=none',
    ),
)
FULL_LENGTH_ROUNDS = (50, 100, 200, 300, 400, 500)


def read_curve(path: str) -> dict[int, dict]:
    """round -> record of a metrics.jsonl (an unfinished last line is ignored)."""
    curve = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            curve[int(record['round'])] = record
    return curve


def load(results: str, seeds: list[str]) -> dict[tuple[str, str], dict[int, dict]]:
    runs = {}
    for code, pattern, _ in CODES:
        for seed in seeds:
            path = os.path.join(results, pattern.format(seed), 'metrics.jsonl')
            if os.path.exists(path):
                runs[(code, seed)] = read_curve(path)
    return runs


def table(runs, seeds: list[str], rounds: list[int], ours: str = 'ours') -> str:
    """Markdown: accuracy (%) and density of the official code and `ours` at `rounds`, per seed
    and mean."""
    lines = [
        '| round | seed | official accuracy | ours accuracy | difference | official density |'
        ' ours density | difference |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for r in rounds:
        pairs = []
        for seed in seeds + ['mean']:
            if seed == 'mean':
                if len(pairs) < 2:
                    continue
                off = tuple(np.mean([p[0][i] for p in pairs]) for i in range(2))
                our = tuple(np.mean([p[1][i] for p in pairs]) for i in range(2))
                label = f'mean of {len(pairs)}'
            else:
                a, b = runs.get(('official', seed), {}).get(r), runs.get((ours, seed), {}).get(r)
                if a is None or b is None:
                    lines.append(
                        f'| {r} | {seed} | {_fmt(a, "accuracy", 100)} | '
                        f'{_fmt(b, "accuracy", 100)} | – | {_fmt(a, "density", 1)} | '
                        f'{_fmt(b, "density", 1)} | – |'
                    )
                    continue
                off, our = (a['accuracy'], a['density']), (b['accuracy'], b['density'])
                pairs.append((off, our))
                label = seed
            lines.append(
                f'| {r} | {label} | {100 * off[0]:.1f} | {100 * our[0]:.1f} | '
                f'{100 * (our[0] - off[0]):+.1f} | {off[1]:.3f} | {our[1]:.3f} | '
                f'{our[1] - off[1]:+.3f} |'
            )
    return '\n'.join(lines)


def _fmt(record, key, scale):
    return (
        'not reached' if record is None else f'{scale * record[key]:.{1 if scale == 100 else 3}f}'
    )


def paired_summary(runs, seeds: list[str]) -> str:
    """Per seed: the mean and largest |ours - official| over the rounds both reached, on shared
    draws, beside the same for the official code's seeds against each other."""

    def gaps(a, b):
        rounds = sorted(set(a) & set(b))
        acc = np.array([100 * abs(a[r]['accuracy'] - b[r]['accuracy']) for r in rounds])
        den = np.array([abs(a[r]['density'] - b[r]['density']) for r in rounds])
        return (
            f'rounds 1-{rounds[-1]}: accuracy mean {acc.mean():.2f} / largest {acc.max():.1f} '
            f'points, density mean {den.mean():.3f} / largest {den.max():.3f}'
        )

    lines = []
    for seed in seeds:
        if ('paired', seed) in runs and ('official', seed) in runs:
            lines.append(
                f'seed {seed}, ours on the official draws against the official code, '
                f'{gaps(runs[("paired", seed)], runs[("official", seed)])}'
            )
        if ('paired', seed) in runs and ('rounding', seed) in runs:
            lines.append(
                f'seed {seed}, ours against ours rounded differently, same draws, '
                f'{gaps(runs[("rounding", seed)], runs[("paired", seed)])}'
            )
    official = [runs[('official', s)] for s in seeds if ('official', s) in runs]
    if lines and len(official) >= 2:
        lines.append(
            f'the official code, seed {seeds[0]} against seed {seeds[1]}, '
            f'{gaps(official[0], official[1])}'
        )
    return '\n'.join(lines)


DIAGNOSIS = 'fidelity_diagnosis_seed1'
# A second ensemble, to round 100, recorded on another CPU (whose float rounding differs from the
# first's, so its runs are not continuations of DIAGNOSIS's).
LONG_ENSEMBLE = 'fidelity_ensemble_seed1'
ENSEMBLE = ('ours', 'rounding') + tuple(
    f'perturb{k}' for k in range(1, 10)
)  # those present are used
# Both codes in float64 on the same draws (record_official.py curve --float64, replay_curve.py
# --float64, rescored against the float64 official run): 'ours' and 'perturb<k>' as above, the
# perturbation one float64 ulp; 'official_mask32' is the same replay of ours rescored against an
# earlier float64 official run whose step function still made its mask in float32.
FLOAT64 = 'fidelity_float64_seed1'
MASK32 = 'official_mask32'
PRECISIONS = ('float32', 'float64', 'float64, official mask in float32')


def load_diagnosis(results: str, folder: str = DIAGNOSIS) -> dict[str, dict[int, dict]]:
    """variant -> its replay_curve.py curve, for the variants recorded under `folder`."""
    folder = os.path.join(results, folder)
    if not os.path.isdir(folder):
        return {}
    return {
        name: read_curve(os.path.join(folder, name, 'metrics.jsonl'))
        for name in sorted(os.listdir(folder))
        if os.path.exists(os.path.join(folder, name, 'metrics.jsonl'))
    }


def diagnosis(variants: dict[str, dict[int, dict]], every: int = 5) -> str:
    """Per round: the official accuracy against every variant's, whether it lies inside the
    ensemble's range, and the last layer's density and the collapse resets, official against the
    ensemble's range; then how far each variant is from the official curve."""
    ensemble = [v for v in ENSEMBLE if v in variants]
    names = ensemble + [v for v in sorted(variants) if v not in ensemble]
    rounds = sorted(set.intersection(*(set(variants[v]) for v in names)))
    head = (
        '| round | official | ' + ' | '.join(names) + ' | official inside the ensemble | '
        'fc4 density: official / ensemble | resets: official / ensemble |'
    )
    lines = [head, '|' + '---|' * (head.count('|') - 1)]
    span = lambda values, f: f'{f(min(values))}-{f(max(values))}'
    for r in rounds:
        if r % every and r != rounds[-1]:
            continue
        official = variants[names[0]][r]
        theirs = 100 * official['official_accuracy']
        acc = [100 * variants[v][r]['accuracy'] for v in ensemble]
        fc4 = [variants[v][r]['layer_density'][-1] for v in ensemble]
        resets = [sum(variants[v][r]['resets']) for v in ensemble]
        inside = min(acc) <= theirs <= max(acc)
        lines.append(
            f'| {r} | {theirs:.1f} | '
            + ' | '.join(f'{100 * variants[v][r]["accuracy"]:.1f}' for v in names)
            + f' | {"yes" if inside else "no"} | '
            f'{official["official_layer_density"][-1]:.3f} / {span(fc4, lambda x: f"{x:.3f}")} | '
            f'{sum(official["official_resets"])} / {span(resets, str)} |'
        )
    gaps = []
    for v in names:
        d = np.array(
            [
                100 * abs(variants[v][r]['accuracy'] - variants[v][r]['official_accuracy'])
                for r in rounds
            ]
        )
        gaps.append(
            f'{v} against the official code, rounds 1-{rounds[-1]}: accuracy mean '
            f'{d.mean():.2f} / largest {d.max():.1f} points'
        )
    spread = np.array(
        [np.ptp([100 * variants[v][r]['accuracy'] for v in ensemble]) for r in rounds]
    )
    inside = sum(
        min(100 * variants[v][r]['accuracy'] for v in ensemble)
        <= 100 * variants[names[0]][r]['official_accuracy']
        <= max(100 * variants[v][r]['accuracy'] for v in ensemble)
        for r in rounds
    )
    gaps.append(
        f'the ensemble ({", ".join(ensemble)}): spread mean {spread.mean():.2f} / largest '
        f'{spread.max():.1f} points; the official curve inside its range in {inside} of '
        f'{len(rounds)} rounds'
    )
    return '\n'.join(lines) + '\n' + '\n'.join(gaps)


def two_cpus(official_a, ours_a, diagnosed_b, every: int = 5) -> str:
    """The official code and ours, each run on two CPU kinds (A: the records `official_fmnist_seed1`
    and `fmnist_official_paired_seed1`; B: the official run that recorded the diagnosis draws and
    `ours` replayed on them), over the rounds all four reached: the table, then each pair's gap."""
    official_b = {
        r: {'accuracy': c['official_accuracy'], 'density': c['official_density']}
        for r, c in diagnosed_b.items()
    }
    curves = {
        'official, CPU A': official_a,
        'official, CPU B': official_b,
        'ours, CPU A': ours_a,
        'ours, CPU B': diagnosed_b,
    }
    rounds = sorted(set.intersection(*(set(c) for c in curves.values())))
    lines = [
        '| round | ' + ' | '.join(curves) + ' | official A - B |',
        '|---|' + '---|' * (len(curves) + 1),
    ]
    acc = lambda c, r: 100 * c[r]['accuracy']
    for r in rounds:
        if r % every and r != rounds[-1]:
            continue
        lines.append(
            f'| {r} | '
            + ' | '.join(f'{acc(c, r):.1f}' for c in curves.values())
            + f' | {acc(official_a, r) - acc(official_b, r):+.1f} |'
        )
    for (x, a), (y, b) in (
        (('official, CPU A', official_a), ('official, CPU B', official_b)),
        (('ours, CPU A', ours_a), ('official, CPU A', official_a)),
        (('ours, CPU B', diagnosed_b), ('official, CPU B', official_b)),
        (('ours, CPU A', ours_a), ('ours, CPU B', diagnosed_b)),
    ):
        d = np.array([abs(acc(a, r) - acc(b, r)) for r in rounds])
        lines.append(
            f'- {x} against {y}, rounds 1-{rounds[-1]}: accuracy mean {d.mean():.2f} / '
            f'largest {d.max():.1f} points'
        )
    return '\n'.join(lines)


def plot_two_cpus(official_a, ours_a, diagnosed_b, path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    from spafl_jax import reporting  # pylint: disable=import-outside-toplevel

    last = max(diagnosed_b)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for curve, key, label, style in (
        (official_a, 'accuracy', 'official code, CPU A', dict(color='tab:red')),
        (
            diagnosed_b,
            'official_accuracy',
            'official code, CPU B',
            dict(color='tab:red', linestyle='--'),
        ),
        (ours_a, 'accuracy', 'spafl_jax, CPU A', dict(color='tab:blue')),
        (diagnosed_b, 'accuracy', 'spafl_jax, CPU B', dict(color='tab:blue', linestyle='--')),
    ):
        rounds = [r for r in sorted(curve) if r <= last]
        ax.plot(rounds, [100 * curve[r][key] for r in rounds], linewidth=1.3, label=label, **style)
    ax.set(
        xlabel='round',
        ylabel='accuracy (%), mean over the 100 clients',
        title='Seed 1, the same draws: each code on two CPU kinds',
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc='lower right')
    reporting.save_figure(fig, path, dpi=110)
    plt.close(fig)


def ensemble_table(variants: dict[str, dict[int, dict]], every: int = 10) -> str:
    """At every `every`-th round that at least two ensemble members reached: the official accuracy
    against the members' (their mean and range), and whether it lies inside the range."""
    ensemble = [v for v in ENSEMBLE if v in variants]
    last = max((max(variants[v]) for v in ensemble), default=0)
    lines = [
        '| round | official | runs | ours | ensemble mean | ensemble range | official inside |',
        '|---|---|---|---|---|---|---|',
    ]
    for r in range(every, last + 1, every):
        members = [v for v in ensemble if r in variants[v]]
        if len(members) < 2:
            continue
        acc = [100 * variants[v][r]['accuracy'] for v in members]
        theirs = 100 * variants[members[0]][r]['official_accuracy']
        ours = (
            f'{100 * variants["ours"][r]["accuracy"]:.1f}' if r in variants.get('ours', {}) else '-'
        )
        lines.append(
            f'| {r} | {theirs:.1f} | {len(members)} ({", ".join(members)}) | {ours} | '
            f'{np.mean(acc):.1f} | {min(acc):.1f}-{max(acc):.1f} | '
            f'{"yes" if min(acc) <= theirs <= max(acc) else "no"} |'
        )
    return '\n'.join(lines) if len(lines) > 2 else ''


def _gaps(variants: dict[str, dict[int, dict]]) -> dict[str, dict[int, float]]:
    """Accuracy gaps in points, per round: 'official' (the official run against ours on its
    draws) and 'perturb<k>' (ours, one ulp moved, against ours as recorded)."""
    ours = variants['ours']
    gaps = {
        'official': {r: 100 * abs(c['accuracy'] - c['official_accuracy']) for r, c in ours.items()}
    }
    for name in sorted(variants):
        if name.startswith('perturb'):
            gaps[name] = {
                r: 100 * abs(c['accuracy'] - ours[r]['accuracy'])
                for r, c in variants[name].items()
                if r in ours
            }
    return gaps


def _first_above(gap: dict[int, float], level: float) -> str:
    return next((str(r) for r in sorted(gap) if gap[r] > level), f'> {max(gap)}')


def precision(
    by_precision: dict[str, dict[str, dict[int, dict]]],
    rounds=(1, 2, 5, 8, 10, 15, 20, 22, 25, 30, 40, 50, 60),
) -> str:
    """The two codes on the same draws in float32 and in float64: per round, how far the official
    curve is from ours, against how far ours moves when its initial weights move by one ulp of
    that precision; then the rounds at which each gap first passes 0.1 and 1 point."""
    gaps = {p: _gaps(v) for p, v in by_precision.items() if 'ours' in v}
    columns = [(p, name) for p, g in gaps.items() for name in g]
    label = lambda p, name: (
        f'{p}: official - ours'
        if name == 'official'
        else f'{p}: ours - ours one ulp ({name[len("perturb") :]})'
    )
    lines = [
        '| round | ' + ' | '.join(label(*c) for c in columns) + ' |',
        '|---|' + '---|' * len(columns),
    ]
    for r in rounds:
        cells = [gaps[p][name].get(r) for p, name in columns]
        if all(c is None for c in cells):
            continue
        lines.append(
            f'| {r} | ' + ' | '.join('-' if c is None else f'{c:.2f}' for c in cells) + ' |'
        )
    lines.append('')
    common = min(max(gaps[p][name]) for p, name in columns)  # the rounds every run reached
    for p, name in columns:
        gap = gaps[p][name]
        lines.append(
            f'- {label(p, name)}: first above 0.1 point at round '
            f'{_first_above(gap, 0.1)}, above 1 point at round {_first_above(gap, 1.0)}; '
            f'mean over rounds 1-{common} '
            f'{np.mean([gap[r] for r in range(1, common + 1)]):.2f}'
        )
    ours32, ours64 = (by_precision.get(p, {}).get('ours') for p in PRECISIONS[:2])
    if ours32 and ours64:  # each code against itself, float64 against float32
        for code, key in (('the official code', 'official_accuracy'), ('ours', 'accuracy')):
            gap = {r: 100 * abs(ours64[r][key] - ours32[r][key]) for r in ours64 if r in ours32}
            worst = max(gap, key=gap.get)
            lines.append(
                f'- {code}, float64 against float32 (same draws, same CPU): first above '
                f'1 point at round {_first_above(gap, 1.0)}, largest {gap[worst]:.1f} '
                f'points (round {worst})'
            )
    if ours64 and 'clients_equal_accuracy' in ours64[min(ours64)]:
        fewest = min(ours64[r]['clients_equal_accuracy'] for r in ours64)
        layers = max(
            max(abs(a - b) for a, b in zip(c['layer_density'], c['official_layer_density']))
            for c in ours64.values()
        )
        lines.append(
            f'- float64: clients whose accuracy equals the official one: at least {fewest} '
            f"of 100 in every round 1-{max(ours64)}; the largest gap in a layer's mean "
            f'kept fraction {layers:.1g}'
        )
    return '\n'.join(lines)


def plot_precision(by_precision: dict[str, dict[str, dict[int, dict]]], path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    from spafl_jax import reporting  # pylint: disable=import-outside-toplevel

    fig, ax = plt.subplots(figsize=(8.5, 5))
    colours = dict(zip(PRECISIONS, ('tab:orange', 'tab:blue', 'tab:purple')))
    last = max(max(v['ours']) for v in by_precision.values() if 'ours' in v)
    for p, variants in by_precision.items():
        if 'ours' not in variants:
            continue
        for name, gap in _gaps(variants).items():
            rounds = [r for r in sorted(gap) if r <= last]
            official = name == 'official'
            label = (
                f'{p}: official code against ours'
                if official
                else f'{p}: ours against ours moved one ulp'
                if name == min(n for n in variants if n.startswith('perturb'))
                else None
            )
            ax.plot(
                rounds,
                [max(gap[r], 1e-3) for r in rounds],
                color=colours.get(p, 'gray'),
                linewidth=1.8 if official else 0.9,
                linestyle='-' if official else '--',
                label=label,
            )
    ax.set_yscale('log')
    ax.set(
        xlabel='round',
        ylabel='accuracy gap (points, mean over 100 clients; floor 0.001)',
        title='Seed 1, the same draws: in float32 the two codes part as a code parts from itself\n'
        'moved one ulp; in float64 they stay equal (gaps at the 0.001 floor)',
    )
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=9, loc='lower right')
    reporting.save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_diagnosis(
    variants: dict[str, dict[int, dict]],
    path: str,
    title: str = 'The official run against ours on the same draws: as recorded, '
    'rounded differently, perturbed by one ulp, and resetting wherever the official '
    'run reset',
) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    from spafl_jax import reporting  # pylint: disable=import-outside-toplevel

    fig, (ax_acc, ax_fc4) = plt.subplots(1, 2, figsize=(12, 4.5))
    # The official curve from the longest record that carries the per-layer fields.
    first = max((c for c in variants.values() if 'official_layer_density' in c[min(c)]), key=len)
    rounds = sorted(first)
    for ax, key, scale in ((ax_acc, 'official_accuracy', 100), (ax_fc4, None, 1)):
        values = (
            [scale * first[r][key] for r in rounds]
            if key
            else [first[r]['official_layer_density'][-1] for r in rounds]
        )
        ax.plot(rounds, values, color='tab:red', linewidth=1.6, label='official code')
    perturbed = [n for n in sorted(variants) if n in ENSEMBLE and n.startswith('perturb')]
    exact = [n for n in sorted(variants) if n in ENSEMBLE and n not in perturbed]
    for name, curve in sorted(variants.items()):
        rs = sorted(curve)
        if name in perturbed:
            label = (
                f'ours, initial weights moved one ulp ({len(perturbed)} runs)'
                if name == perturbed[0]
                else None
            )
            kwargs = dict(color='tab:cyan', linewidth=0.8, alpha=0.8, label=label)
        elif name in exact:
            label = f'ours, recorded weights ({", ".join(exact)})' if name == exact[0] else None
            kwargs = dict(color='tab:blue', linewidth=1.1, label=label)
        else:
            kwargs = dict(color='tab:green', linewidth=1.4, label=f'ours: {name}')
        ax_acc.plot(rs, [100 * curve[r]['accuracy'] for r in rs], **kwargs)
        if 'layer_density' in curve[rs[0]]:  # records from before the per-layer fields lack it
            ax_fc4.plot(rs, [curve[r]['layer_density'][-1] for r in rs], **kwargs)
    ax_acc.set(
        xlabel='round',
        ylabel='accuracy (%), mean over the 100 clients',
        title='Test accuracy on the official seed-1 draws',
    )
    ax_fc4.set(
        xlabel='round',
        ylabel='kept rows of the last layer (fc4), mean over clients',
        title='Last-layer density',
    )
    for ax in (ax_acc, ax_fc4):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc='lower right' if ax is ax_acc else 'upper right')
    fig.suptitle(title, fontsize=10)
    reporting.save_figure(fig, path, dpi=110)
    plt.close(fig)


def load_full_length(results: str, seeds: list[str]) -> dict[tuple[str, str], dict[int, dict]]:
    """(code, seed) -> the evaluated rounds of each FULL_LENGTH record present."""
    runs = {}
    for code, pattern, _ in FULL_LENGTH:
        for seed in seeds:
            path = os.path.join(results, pattern.format(seed), 'metrics.jsonl')
            if os.path.exists(path):
                curve = {r: x for r, x in read_curve(path).items() if 'accuracy' in x}
                if curve:
                    runs[(code, seed)] = curve
    return runs


def full_length_table(runs, rounds=FULL_LENGTH_ROUNDS) -> str:
    """Markdown: each full-length record's accuracy (%) / density at `rounds`, its best accuracy
    (and round), its last round and how far that lies below the best."""
    labels = {code: label for code, _, label in FULL_LENGTH}
    lines = [
        '| code | seed | '
        + ' | '.join(f'round {r}' for r in rounds)
        + ' | best (round) | last round | last - best (points) |',
        '|---|---|' + '---|' * (len(rounds) + 3),
    ]
    order = {code: i for i, (code, _, _) in enumerate(FULL_LENGTH)}
    for code, seed in sorted(runs, key=lambda key: (order[key[0]], key[1])):
        curve = runs[(code, seed)]
        cells = [
            f'{100 * curve[r]["accuracy"]:.1f} / {curve[r]["density"]:.3f}' if r in curve else '–'
            for r in rounds
        ]
        best = max(curve, key=lambda r: curve[r]['accuracy'])
        last = max(curve)
        gap = 100 * (curve[last]['accuracy'] - curve[best]['accuracy'])
        lines.append(
            f'| {labels[code]} | {seed} | '
            + ' | '.join(cells)
            + f' | {100 * curve[best]["accuracy"]:.1f} ({best}) | {last} | {gap:+.1f} |'
        )
    return '\n'.join(lines)


def plot_full_length(runs, path: str) -> None:
    """Accuracy and density by round of the full-length records, one colour per code."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    colours = {'official': 'tab:red', 'default': 'tab:blue', 'no_update': 'tab:green'}
    labels = {code: label for code, _, label in FULL_LENGTH}
    fig, (ax_acc, ax_den) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (code, seed), curve in sorted(runs.items()):
        rounds = sorted(curve)
        kwargs = dict(
            color=colours[code],
            linestyle='-' if seed == '1' else '--',
            linewidth=1.2,
            label=f'{labels[code]}, seed {seed}',
        )
        ax_acc.plot(rounds, [100 * curve[r]['accuracy'] for r in rounds], **kwargs)
        ax_den.plot(rounds, [curve[r]['density'] for r in rounds], **kwargs)
    _finish_curves(
        fig,
        ax_acc,
        ax_den,
        '500 rounds: the official code against our defaults',
        path,
        accuracy_ylim=(40, 95),
    )


def _finish_curves(fig, ax_acc, ax_den, title: str, path: str, accuracy_ylim=None) -> None:
    """Labels, grid and legend of an accuracy / density pair of panels; saves and closes."""
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    from spafl_jax import reporting  # pylint: disable=import-outside-toplevel

    ax_acc.set(
        xlabel='round',
        ylabel='accuracy (%), mean over the 100 clients',
        title='Test accuracy, each client on its own split',
    )
    if accuracy_ylim is not None:
        ax_acc.set_ylim(*accuracy_ylim)
    ax_den.set(
        xlabel='round',
        ylabel='density (mean over layers of kept rows)',
        title='Density',
        ylim=(0, 1.02),
    )
    for ax in (ax_acc, ax_den):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8, loc='lower right')
    fig.suptitle(f'Fashion-MNIST, LeNet-5, 100 clients (10 per round): {title}', fontsize=11)
    reporting.save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot(
    runs,
    seeds: list[str],
    path: str,
    codes=('official', 'ours', 'current'),
    title='official code vs fmnist.py:official',
) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, (ax_acc, ax_den) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {
        'official': 'tab:red',
        'ours': 'tab:blue',
        'current': 'tab:gray',
        'paired': 'tab:green',
        'rounding': 'tab:olive',
    }
    styles = {seed: style for seed, style in zip(seeds, ('-', '--', ':', '-.'))}
    last = max((max(c) for (code, _), c in runs.items() if code == 'paired' and c), default=None)
    for (code, seed), curve in sorted(runs.items()):
        if code not in codes:
            continue
        if code == 'official' and 'paired' in codes and ('paired', seed) not in runs:
            continue
        rounds = sorted(curve)
        if 'paired' in codes and last is not None:  # the official curve over the paired rounds
            rounds = [r for r in rounds if r <= last]
        label = f'{dict((c, t) for c, _, t in CODES)[code]}, seed {seed}'
        kwargs = dict(
            color=colours[code],
            linestyle=styles.get(seed, '-'),
            linewidth=0.8 if code in ('current', 'rounding') else 1.2,
            alpha=0.6 if code in ('current', 'rounding') else 1.0,
            label=label,
        )
        ax_acc.plot(rounds, [100 * curve[r]['accuracy'] for r in rounds], **kwargs)
        ax_den.plot(rounds, [curve[r]['density'] for r in rounds], **kwargs)
    _finish_curves(fig, ax_acc, ax_den, title, path)


def main(argv):
    del argv
    seeds = _SEEDS.value
    runs = load(_RESULTS.value, seeds)
    full_length = load_full_length(_RESULTS.value, seeds)
    if not runs and not any(code == 'official' for code, _ in full_length):
        raise SystemExit(
            f'error: no run records in --results={_RESULTS.value}; see the module '
            'docstring for the runs it expects.'
        )
    rounds = [int(r) for r in _ROUNDS.value]
    out = _OUT.value or os.path.join(_RESULTS.value, 'fidelity_fmnist.png')
    if runs:
        print(table(runs, seeds, rounds))
        if any(code == 'current' for code, _ in runs):
            print('\nours with collapse_check=current:')
            print(table(runs, seeds, rounds, ours='current'))
        plot(runs, seeds, out)
        print(f'figure: {out}')
    variants = load_diagnosis(_RESULTS.value)
    if any(code == 'paired' for code, _ in runs):
        print('\nours on the official draws (split, initial model, clients, batches):')
        print(table(runs, seeds, rounds, ours='paired'))
        print(paired_summary(runs, seeds))
        paired = os.path.join(os.path.dirname(out), 'fidelity_fmnist_paired.png')
        plot(
            runs,
            seeds,
            paired,
            codes=('official', 'paired', 'rounding'),
            title='official code vs spafl_jax on the same draws',
        )
        print(f'figure: {paired}')
    if variants:
        print('\nseed 1, the gap diagnosed (ours on the official draws, every 5 rounds):')
        print(diagnosis(variants))
        figure = os.path.join(os.path.dirname(out), 'fidelity_fmnist_diagnosis.png')
        plot_diagnosis(variants, figure)
        print(f'figure: {figure}')
    if variants.get('ours') and ('official', '1') in runs and ('paired', '1') in runs:
        print('\nseed 1, each code on two CPU kinds (the same draws, float rounding apart):')
        print(two_cpus(runs[('official', '1')], runs[('paired', '1')], variants['ours']))
        figure = os.path.join(os.path.dirname(out), 'fidelity_fmnist_cpus.png')
        plot_two_cpus(runs[('official', '1')], runs[('paired', '1')], variants['ours'], figure)
        print(f'figure: {figure}')
    if any(code == 'official' for code, _ in full_length):
        text = full_length_table(full_length)
        print('\nat full length, the official code against our defaults:')
        print(text)
        document = os.path.join(_RESULTS.value, 'full_length_fmnist.md')
        command = f'python research/fidelity.py --results={_RESULTS.value}'
        files.write_atomic(
            document,
            '# The official code against our defaults at 500 rounds\n\n'
            f'Command: `{command}`\n\n'
            'Accuracy (%) / density at each round (the unweighted mean over the 100 clients of '
            "each one's accuracy on its own test split; the layer mean of kept rows).\n\n"
            + text
            + '\n',
        )
        figure = os.path.join(os.path.dirname(out), 'full_length_fmnist.png')
        plot_full_length(full_length, figure)
        print(f'table: {document}\nfigure: {figure}')
    long_variants = load_diagnosis(_RESULTS.value, LONG_ENSEMBLE)
    float64 = load_diagnosis(_RESULTS.value, FLOAT64)
    if float64 and long_variants:
        by_precision = dict(
            zip(
                PRECISIONS,
                (
                    long_variants,
                    {k: v for k, v in float64.items() if k != MASK32},
                    {'ours': float64[MASK32]} if MASK32 in float64 else {},
                ),
            )
        )
        print(
            '\nseed 1, both codes in float32 and in float64 on the same draws (accuracy gaps, '
            'points):'
        )
        print(precision(by_precision))
        figure = os.path.join(os.path.dirname(out), 'fidelity_fmnist_precision.png')
        plot_precision(by_precision, figure)
        print(f'figure: {figure}')
    if long_variants:
        print('\nseed 1, the ensemble to round 100 (ours on the official draws, every 10 rounds):')
        print(ensemble_table(long_variants))
        figure = os.path.join(os.path.dirname(out), 'fidelity_fmnist_ensemble.png')
        plot_diagnosis(
            long_variants,
            figure,
            title='The official seed-1 run against ours to '
            'round 100: as recorded and perturbed by one ulp (same draws)',
        )
        print(f'figure: {figure}')


if __name__ == '__main__':
    app.run(main)
