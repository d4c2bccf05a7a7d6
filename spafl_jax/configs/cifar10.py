r"""SpaFL on CIFAR-10 with Conv4 (docs/algorithm.md, sections 5-6).

    python experiments/main.py --config=cifar10.py
    python experiments/main.py --config=cifar10.py:official   # what the official folder does

CIFAR-10 is downloaded on first use (cifar-10-binary.tar.gz, 170 MB, checked) into data_dir (default
~/.cache/spafl_jax); tensorflow-datasets data prepared in data_dir is read too (docs/extending.md).
"""

import ml_collections

from spafl_jax.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset = 'cifar10'
    config.model = 'conv4'
    config.augment = 'crop_flip'
    config.num_clients = 100
    config.clients_per_round = 10
    config.alpha = 0.1
    config.rounds = 500
    config.batch_size = 16
    config.local_epochs = 5
    config.lr = 0.01
    config.lr_decay = 1.0
    config.clip = 3.0
    config.th_coeff = 1.5e-4
    config.penalty_warmup = False
    if arg == 'official':
        apply_official_cifar10(config)
    elif arg:
        raise ValueError(f'cifar10.py takes no argument or "official", got {arg!r}.')
    return config


def apply_official_cifar10(config: ml_collections.ConfigDict) -> None:
    """The behaviour of the official CIFAR-10 folder, where it differs from our defaults.

    Its loader's HWC->CHW reshape scrambles the images; that bug is never reproduced.
    """
    config.estimator = 'outside_unit'
    config.importance_update = 'all_after'
    config.persistent_optimizer = False
    config.raw_pixels = True
    config.augment = 'none'
    config.collapse_check = 'previous'  # resets on the previous forward pass's mask, test included
