r"""Exports every client of a SpaFL run as a compact dense model. The logic lives in
`spafl_jax.export`; this file only parses flags and prints.

    python experiments/export.py --workdir=runs/fmnist_lenet5 [--out=DIR] [--batch_size=256] \
        [--clients=0,1,2]

Writes `client_XXX.npz` + `client_XXX.json` per client and `compact_numpy.py` (numpy-only loader and
forward) into --out (default WORKDIR/compact), and prints per client: parameters before and after,
bytes on disk, and the jitted forward time of the masked and the compact model on the same batch.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # works uninstalled

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

from spafl_jax import export

_WORKDIR = flags.DEFINE_string(
    'workdir', None, f'Run directory with config.json and {export.STATE_FILE}.', required=True
)
_OUT = flags.DEFINE_string('out', None, 'Output directory (default: WORKDIR/compact).')
_BATCH = flags.DEFINE_integer('batch_size', 256, 'Batch of random images the timing uses.')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls per model (median reported).')
_CLIENTS = flags.DEFINE_list('clients', None, 'Client ids to export (default: every client).')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    out = _OUT.value or os.path.join(_WORKDIR.value, 'compact')
    try:
        clients = None if _CLIENTS.value is None else [int(c) for c in _CLIENTS.value]
    except ValueError:
        raise app.UsageError(
            f'--clients must be integers, got {",".join(_CLIENTS.value)}'
        ) from None
    try:
        rows = export.export_workdir(
            _WORKDIR.value, out, batch_size=_BATCH.value, repeats=_REPEATS.value, clients=clients
        )
    except (OSError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    print(
        f'{"client":>6} {"params before":>14} {"params after":>13} {"kept":>6} {"bytes":>10} '
        f'{"masked ms":>10} {"compact ms":>10} {"speed-up":>8} {"max |diff|":>10}'
    )
    done = [r for r in rows if 'error' not in r]
    for r in rows:
        if 'error' in r:
            print(f'{r["client"]:>6} {r["params_before"]:>14,} not exported: {r["error"]}')
            continue
        print(
            f'{r["client"]:>6} {r["params_before"]:>14,} {r["params_after"]:>13,} '
            f'{r["params_after"] / r["params_before"]:>6.1%} {r["bytes"]:>10,} '
            f'{1e3 * r["masked_s"]:>10.3f} {1e3 * r["compact_s"]:>10.3f} {r["speedup"]:>7.2f}x '
            f'{r["max_abs_diff"]:>10.2e}'
        )
    if done:
        kept = np.mean([r['params_after'] / r['params_before'] for r in done])
        speedup = np.mean([r['speedup'] for r in done])
        print(
            f'mean over {len(done)} exported clients: parameters kept {kept:.1%}, '
            f'speed-up {speedup:.2f}x (batch {_BATCH.value}); files in {out}'
        )
    if len(done) < len(rows):
        print(f'{len(rows) - len(done)} client(s) not exported (see above).')


if __name__ == '__main__':
    app.run(main)
