r"""Round times of two checkouts of this repository, taken alternately in one run: their ratio.

    git worktree add /tmp/before <commit>
    python research/benchmarks/versions.py --before=/tmp/before --repeats=3 \
        -- --models=lenet5 --strategies=map,vmap --rounds=4
    python research/benchmarks/versions.py --before=/tmp/before --script=scale \
        -- --tiers=disk --clients=100000 --rounds=5

With `--script=scale`, `scale.py` of each checkout is run instead (the table of its client-store
tiers), and its rows are keyed by (clients, tier).

Runs `rounds.py` of each checkout (its own code, in a fresh process, with the given arguments:
`research/benchmarks/rounds.py`, or `experiments/benchmarks/rounds.py` in a checkout from before
the benchmarks moved to research/), before, after, before, after, ... so that both see the same
machine at the same moments, and prints per model and strategy the median seconds per round of
each and their ratio (after / before: below 1 is faster).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROW = re.compile(r'^(\S+)\s+(python loop|loop|map|vmap|run_round)\s+([0-9.]+)\s')


# Where the benchmarks lie in a checkout: now, and before they moved to research/.
BENCHMARK_DIRS = (os.path.join('research', 'benchmarks'), os.path.join('experiments', 'benchmarks'))


def rounds_script(checkout: str, name: str = 'rounds') -> str:
    """The path of `<name>.py` in `checkout`, wherever its commit keeps it."""
    for directory in BENCHMARK_DIRS:
        path = os.path.join(checkout, directory, f'{name}.py')
        if os.path.isfile(path):
            return path
    raise SystemExit(f'error: {checkout} has no {name}.py (looked in {", ".join(BENCHMARK_DIRS)})')


def round_times(
    checkout: str, arguments: list[str], script: str = 'rounds'
) -> dict[tuple[str, str], float]:
    """(model, strategy) -> seconds per round, as rounds.py of `checkout` prints them; with
    `script='scale'`, (clients, tier) -> seconds per round of scale.py's rows."""
    env = dict(os.environ, PYTHONPATH=checkout)
    out = subprocess.run(
        [sys.executable, rounds_script(checkout, script), *arguments],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f'error: {script}.py of {checkout} failed:\n{out.stderr[-2000:]}')
    times = {}
    header = None
    for line in out.stdout.splitlines():
        if script == 'scale' and line.startswith('|'):  # scale.py's markdown table
            cells = [c.strip() for c in line.strip('|').split('|')]
            if header is None:
                header = cells
            elif not set(cells[0]) <= {'-'}:
                row = dict(zip(header, cells))
                times[(row['clients'], row.get('tier', 'device'))] = float(row['round s'])
            continue
        m = ROW.match(line)
        if m:
            times[(m.group(1), m.group(2))] = float(m.group(3))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--before', required=True, help='checkout of the earlier commit')
    parser.add_argument('--after', default=HERE, help='checkout of the later one (this one)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--script', default='rounds', choices=('rounds', 'scale'))
    parser.add_argument('arguments', nargs='*', help='rounds.py arguments, after --')
    args = parser.parse_args()
    times = {'before': collections.defaultdict(list), 'after': collections.defaultdict(list)}
    for i in range(args.repeats):
        for which in ('before', 'after'):
            for key, seconds in round_times(
                getattr(args, which), args.arguments, args.script
            ).items():
                times[which][key].append(seconds)
            print(f'repeat {i + 1}/{args.repeats}: {which} done', flush=True)
    print(f'{"model":<11} {"strategy":<12} {"before s":>9} {"after s":>9} {"after/before":>12}')
    for key in sorted(set(times['before']) & set(times['after'])):
        before, after = (float(np.median(times[w][key])) for w in ('before', 'after'))
        print(f'{key[0]:<11} {key[1]:<12} {before:9.3f} {after:9.3f} {after / before:12.2f}')


if __name__ == '__main__':
    main()
