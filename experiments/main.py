r"""Runs SpaFL. The logic lives in `spafl_jax.train`; this file only parses flags.

    python experiments/main.py                                   # embedded default: digits
    python experiments/main.py --config=fmnist.py --config.rounds=20 --workdir=/tmp/fmnist
    python experiments/main.py --config=cifar10.py --config.data_dir=~/tensorflow_datasets

A bare config file name resolves to experiments/configs/.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # no install needed

from experiments import common  # pylint: disable=g-import-not-at-top

sys.argv = common.resolve_config_argument(sys.argv)

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

from spafl_jax import configuration
from spafl_jax import data as data_lib
from spafl_jax import train

_CONFIG = common.define_config_flag(
    os.path.join(common.CONFIG_DIR, 'default.py'), 'Config file (a bare name is looked up in '
    'experiments/configs/); override fields with --config.FIELD=VALUE.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, figures and checkpoints '
                               '(default: runs/<dataset>_<model>_<time>); the same command on the '
                               'same workdir resumes from its newest good checkpoint.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a run with a different config that '
                               'already lives in --workdir.')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join(
        'runs', f'{config.get("dataset", "run")}_{config.get("model", "")}_'
        f'{time.strftime("%Y%m%d-%H%M%S")}')
    try:
        summary = train.train_and_evaluate(config, workdir, overwrite=_OVERWRITE.value)
    except (configuration.ConfigError, data_lib.DatasetUnavailableError,
            train.WorkdirError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except train.NonFiniteError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(3)
    except train.Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(128 + e.signum)
    logging.info('done: accuracy %.2f%%, density %.2f%%, %.2f s per round; results in %s',
                 100 * summary['accuracy'], 100 * summary['density'],
                 summary['seconds_per_round'], workdir)


if __name__ == '__main__':
    app.run(main, flags_parser=common.parse_flags)
