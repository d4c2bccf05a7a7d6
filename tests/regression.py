r"""The refactoring guard: a pinned commit and the working tree run the same jobs on this machine, and
their records must be byte-identical.

    python tests/regression.py --pin=641e819             # every case
    python tests/regression.py --pin=641e819 --cases=default,fedavg

The pinned commit is checked out in a git worktree (once, under --out) and each case runs there and
here as the command a user types (`experiments/main.py`, each checkout's own code, a fresh process);
the pinned side's records are kept under --out/<commit> and reused. Compared: the names of the files
the run wrote, and byte for byte `metrics.jsonl` with its timing fields left out and
`final_state.msgpack` (the disk store: the clients' files). Exit status 1 when a case
differs, with the first differing line. Not a pytest module: a step of a refactor runs it by hand
(it takes minutes), and CI runs the tests that pin behaviour to hand-checked values instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_FIELDS = ('seconds', 'round_seconds', 'time', 'elapsed')

# name -> the flags of experiments/main.py (on top of --workdir).
_DIGITS3 = ['--config.rounds=3', '--config.checkpoint_every=2']
CASES = {
    'default': [],
    'default_1device': ['--config.num_cpu_devices=0', '--config.rounds=10'],
    'fmnist3': ['--config=fmnist.py', '--config.rounds=3'],
    **{
        method: [f'--config.method={method}', *_DIGITS3]
        for method in ('fedavg', 'local', 'fedpm', 'heterofl', 'fedspa')
    },
    'map': ['--config.client_execution=map', *_DIGITS3],
    'vmap': ['--config.client_execution=vmap', *_DIGITS3],
    'disk_store': ['--config.client_store=disk', *_DIGITS3],
    'eager_importance': ['--config.lazy_importance=false', *_DIGITS3],
}


def _config_flag(checkout: str, flags: list[str]) -> list[str]:
    """`--config=<file>` resolved inside `checkout` (the two checkouts each read their own)."""
    out = []
    for flag in flags:
        if flag.startswith('--config=') and '/' not in flag:
            name = flag.split('=', 1)[1]
            flag = '--config=' + os.path.join(checkout, 'spafl_jax', 'configs', name)
        out.append(flag)
    return out


def run_case(checkout: str, workdir: str, flags: list[str]) -> None:
    if os.path.exists(workdir):
        shutil.rmtree(workdir)
    env = dict(os.environ, PYTHONPATH=checkout)
    env.pop('XLA_FLAGS', None)
    command = [
        sys.executable,
        os.path.join(checkout, 'experiments', 'main.py'),
        f'--workdir={workdir}',
        *_config_flag(checkout, flags),
    ]
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f'{" ".join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}')


def records(workdir: str) -> tuple[list[str], bytes]:
    """(metrics.jsonl's lines without timing fields, the final state's bytes: final_state.msgpack,
    or with the disk store, the clients' files)."""
    lines = []
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        for line in f:
            record = json.loads(line)
            for field in TIMING_FIELDS:
                record.pop(field, None)
            lines.append(json.dumps(record, sort_keys=True))
    state = os.path.join(workdir, 'final_state.msgpack')
    if os.path.exists(state):
        with open(state, 'rb') as f:
            return lines, f.read()
    clients = os.path.join(workdir, 'clients')
    chunks = []
    for name in sorted(os.listdir(clients)):
        if os.path.isfile(os.path.join(clients, name)):
            with open(os.path.join(clients, name), 'rb') as f:
                chunks.append(name.encode() + b'\0' + f.read())
    return lines, b''.join(chunks)


def first_difference(before: list[str], after: list[str]) -> str:
    for i, (b, a) in enumerate(zip(before, after)):
        if b != a:
            fields = {k for k in json.loads(b)} | {k for k in json.loads(a)}
            differ = sorted(k for k in fields if json.loads(b).get(k) != json.loads(a).get(k))
            return f'line {i + 1}: {", ".join(differ)}\n  pinned: {b}\n  here:   {a}'
    return f'{len(before)} lines pinned, {len(after)} here'


def pinned_checkout(pin: str, out: str) -> tuple[str, str]:
    commit = subprocess.run(
        ['git', 'rev-parse', pin], cwd=HERE, capture_output=True, text=True, check=True
    ).stdout.strip()
    path = os.path.join(out, f'checkout_{commit[:12]}')
    if not os.path.exists(path):
        subprocess.run(
            ['git', 'worktree', 'add', '--detach', path, commit],
            cwd=HERE,
            check=True,
            capture_output=True,
        )
    return commit, path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--pin', required=True, help='the commit whose records are the reference')
    parser.add_argument('--cases', default=','.join(CASES), help='comma-separated case names')
    parser.add_argument('--out', default='/tmp/spafl_regression', help='worktree and records')
    args = parser.parse_args()
    names = args.cases.split(',')
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f'--cases: no case {unknown}; the cases are {", ".join(CASES)}')
    commit, checkout = pinned_checkout(args.pin, args.out)
    failed = []
    for name in names:
        pinned_dir = os.path.join(args.out, commit[:12], name)
        if not os.path.exists(os.path.join(pinned_dir, 'summary.json')):
            run_case(checkout, pinned_dir, CASES[name])
        here_dir = os.path.join(args.out, 'here', name)
        run_case(HERE, here_dir, CASES[name])
        (b_lines, b_state), (a_lines, a_state) = records(pinned_dir), records(here_dir)
        b_files, a_files = sorted(os.listdir(pinned_dir)), sorted(os.listdir(here_dir))
        if b_files != a_files:
            failed.append(name)
            print(f'{name}: the workdirs hold other files: {sorted(set(b_files) ^ set(a_files))}')
        elif b_lines != a_lines:
            failed.append(name)
            print(f'{name}: metrics.jsonl differs, {first_difference(b_lines, a_lines)}')
        elif b_state != a_state:
            failed.append(name)
            print(f'{name}: final_state.msgpack differs (metrics.jsonl identical)')
        else:
            print(f'{name}: identical ({len(a_lines)} records, {len(a_state)} state bytes)')
        sys.stdout.flush()
    print(f'{len(names) - len(failed)} of {len(names)} cases identical to {commit[:12]}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
