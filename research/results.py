r"""Every table and figure of RESULTS.md, rebuilt from the compact run records in research/results/.

    python research/results.py                  # all of them
    python research/results.py --only=compare   # one part: fidelity | tuning | compare | ablation

Nothing trains: each part is one of the commands reading records (config.json, metrics.jsonl,
summary.json), run as RESULTS.md gives it: research/fidelity.py, research/tuning.py, and the
user-facing experiments/compare.py and experiments/ablation.py with --records_only. A part whose
records are not in --results yet is named and skipped.

Then the tables are copied into the document (--document, RESULTS.md), between markers that name
the file they come from, relative to the document's folder, and optionally the line to start at:

    <!-- include research/results/compare_fmnist500/comparison.md -->
    ...replaced by the file without its title line...
    <!-- end include -->

    <!-- include research/results/tune_digits/tuning.md from "Settings run with several seeds" -->
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(REPO, 'research')  # research/fidelity.py, research/tuning.py
EXPERIMENTS = os.path.join(REPO, 'experiments')  # experiments/compare.py, experiments/ablation.py
METHODS = 'spafl,fedavg,local,fedpm,heterofl,fedspa'

# (part, the folder under --results it reads, the command: its script and its arguments).
PARTS = (
    (
        'fidelity',
        'official_fmnist_seed1',
        [
            os.path.join(HERE, 'fidelity.py'),
            '--results={results}',
            '--rounds=10,25,50,75,100,125,150,175,200',
        ],
    ),
    (
        'tuning',
        'tune_fmnist',
        [
            os.path.join(HERE, 'tuning.py'),
            '--runs={results}/tune_fmnist',
            '--config=fmnist.py',
            '--rounds=50,100,200,300,500',
        ],
    ),
    (
        'tuning',
        'tune_digits',
        [
            os.path.join(HERE, 'tuning.py'),
            '--runs={results}/tune_digits',
            '--config=default.py',
            '--rounds=25,50',
        ],
    ),
    (
        'compare',
        'compare_fmnist500',
        [
            os.path.join(EXPERIMENTS, 'compare.py'),
            '--records_only',
            '--workdir={results}/compare_fmnist500',
            f'--methods={METHODS}',
            '--seeds=1,2',
        ],
    ),
    (
        'ablation',
        'ablation_fmnist500',
        [
            os.path.join(EXPERIMENTS, 'ablation.py'),
            '--records_only',
            '--workdir={results}/ablation_fmnist500',
            '--seeds=1',
        ],
    ),
)

_RESULTS = flags.DEFINE_string(
    'results',
    os.path.join(HERE, 'results'),
    "Folder of the compact run records (default: the repository's).",
)
_DOCUMENT = flags.DEFINE_string(
    'document',
    os.path.join(REPO, 'RESULTS.md'),
    'The document whose include markers receive the tables (empty: none).',
)
_ONLY = flags.DEFINE_list(
    'only',
    [],
    'Parts to rebuild (default: all): '
    + ', '.join(dict.fromkeys(part for part, _, _ in PARTS))
    + '.',
)


_INCLUDE = re.compile(
    r'(<!-- include (?P<path>\S+)(?: from "(?P<start>[^"]+)")? -->\n)'
    r'.*?(?=<!-- end include -->)',
    re.DOTALL,
)


def included_text(path: str, start: str | None) -> str:
    """The file's text from the line beginning with `start` (from its first line that is not a
    `# ` title where None), ending with one newline; ValueError naming the file and the fix."""
    with open(path) as f:
        lines = f.read().splitlines()
    if start is None:
        while lines and (lines[0].startswith('# ') or not lines[0].strip()):
            lines.pop(0)
    else:
        begins = [i for i, line in enumerate(lines) if line.startswith(start)]
        if not begins:
            raise ValueError(
                f'{path} has no line beginning with "{start}": correct the include marker.'
            )
        lines = lines[begins[0] :]
    return '\n'.join(lines).rstrip('\n') + '\n'


def include_tables(document: str) -> list[str]:
    """Replaces every include block of `document` with its file's current text (written only if it
    changed); returns the included paths, and names those missing as not yet built."""
    with open(document) as f:
        text = f.read()
    folder = os.path.dirname(os.path.abspath(document))
    included = []

    def replace(match: re.Match) -> str:
        path = os.path.join(folder, match['path'])
        if not os.path.exists(path):
            print(f'== include: {match["path"]} not built yet; its block in {document} is kept')
            return match[0]
        included.append(match['path'])
        return match[1] + included_text(path, match['start'])

    new = _INCLUDE.sub(replace, text)
    if new != text:
        with open(document + '.tmp', 'w') as f:
            f.write(new)
        os.replace(document + '.tmp', document)
    return included


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    known = {part for part, _, _ in PARTS}
    unknown = sorted(set(_ONLY.value) - known)
    if unknown:
        raise app.UsageError(
            f'--only: unknown part(s) {", ".join(unknown)}; the parts are '
            f'{", ".join(sorted(known))}.'
        )
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
        command = [sys.executable, arguments[0]]
        command += [a.format(results=results) for a in arguments[1:]]
        print(
            f'== {part}: {os.path.relpath(arguments[0], REPO)} {" ".join(command[2:])}', flush=True
        )
        if subprocess.run(command, cwd=REPO, check=False).returncode:
            failed.append(part)
    if failed:
        print(f'error: {", ".join(failed)} failed (above).', file=sys.stderr)
        sys.exit(1)
    if _DOCUMENT.value:
        try:
            included = include_tables(_DOCUMENT.value)
        except (OSError, ValueError) as e:
            print(f'error: --document={_DOCUMENT.value}: {e}', file=sys.stderr)
            sys.exit(1)
        print(f'== {_DOCUMENT.value}: {len(included)} table(s) included')


if __name__ == '__main__':
    app.run(main)
