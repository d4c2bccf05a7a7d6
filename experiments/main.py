r"""Runs SpaFL without installing the package: the same command as `spafl-train`.

    python experiments/main.py                                   # embedded default: digits
    python experiments/main.py --config=fmnist.py --config.rounds=20 --workdir=/tmp/fmnist
    python experiments/main.py --config=cifar10.py               # downloads CIFAR-10 on first use

A bare config file name resolves to spafl_jax/configs/. The command is `spafl_jax.cli.run`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # no install needed

from spafl_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
    cli.run()
