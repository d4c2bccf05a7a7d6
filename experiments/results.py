r"""Every table and figure of RESULTS.md, rebuilt from the compact run records in results/.

    python experiments/results.py                  # all of them
    python experiments/results.py --only=compare   # one part: fidelity | tuning | compare | ablation

Nothing trains: each part is one of the experiment commands reading records (config.json,
metrics.jsonl, summary.json), run as RESULTS.md gives it. A part whose records are not in
--results yet is named and skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = 'spafl,fedavg,local,fedpm,heterofl,fedspa'

# (part, the folder under --results it reads, the command's arguments after the script).
PARTS = (
    ('fidelity', 'official_fmnist_seed1', ['fidelity.py', '--results={results}',
                                           '--rounds=10,25,50,75,100,125,150,175,200']),
    ('tuning', 'tune_fmnist', ['tuning.py', '--runs={results}/tune_fmnist', '--config=fmnist.py',
                               '--rounds=50,100,200']),
    ('tuning', 'tune_digits', ['tuning.py', '--runs={results}/tune_digits', '--config=default.py',
                               '--rounds=25,50']),
    ('compare', 'compare_fmnist500', ['compare.py', '--records_only',
                                      '--workdir={results}/compare_fmnist500',
                                      f'--methods={METHODS}', '--seeds=1,2']),
    ('ablation', 'ablation_fmnist500', ['ablation.py', '--records_only',
                                        '--workdir={results}/ablation_fmnist500', '--seeds=1']),
)

_RESULTS = flags.DEFINE_string('results', os.path.join(REPO, 'results'),
                               'Folder of the compact run records (default: the repository\'s).')
_ONLY = flags.DEFINE_list('only', [], 'Parts to rebuild (default: all): '
                          + ', '.join(dict.fromkeys(part for part, _, _ in PARTS)) + '.')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    known = {part for part, _, _ in PARTS}
    unknown = sorted(set(_ONLY.value) - known)
    if unknown:
        raise app.UsageError(f'--only: unknown part(s) {", ".join(unknown)}; the parts are '
                             f'{", ".join(sorted(known))}.')
    # Relative to the repository where it lies inside it, so the tables' commands read portably.
    results = os.path.abspath(_RESULTS.value)
    if results.startswith(REPO + os.sep):
        results = os.path.relpath(results, REPO)
    failed = []
    for part, folder, arguments in PARTS:
        if _ONLY.value and part not in _ONLY.value:
            continue
        if not os.path.isdir(os.path.join(REPO, results, folder)):
            print(f'== {part}: no records in {os.path.join(results, folder)} yet, skipped')
            continue
        command = [sys.executable, os.path.join(REPO, 'experiments', arguments[0])]
        command += [a.format(results=results) for a in arguments[1:]]
        print(f'== {part}: {" ".join(command[1:])}', flush=True)
        if subprocess.run(command, cwd=REPO, check=False).returncode:
            failed.append(part)
    if failed:
        print(f'error: {", ".join(failed)} failed (above).', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    app.run(main)
