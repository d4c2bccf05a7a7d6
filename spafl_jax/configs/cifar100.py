r"""SpaFL on CIFAR-100 with the half-width pre-activation ResNet-18 (docs/algorithm.md, sections 5-6).

    python experiments/main.py --config=cifar100.py
    python experiments/main.py --config=cifar100.py:official   # the official folder's behaviour

CIFAR-100 is downloaded on first use (cifar-100-binary.tar.gz, 169 MB, checked) into data_dir
(default ~/.cache/spafl_jax); tensorflow-datasets data prepared in data_dir is read too (docs/extending.md).
The 100 fine labels are used.

`:official` assumes the official CIFAR-100 folder behaves like the CIFAR-10 folder
(docs/algorithm.md, sections 3 and 6 name only the penalty warm-up as a difference, and the
warm-up is already on here): the `outside_unit` estimator, importance update to all clients
after aggregation, a fresh optimizer each round, raw 0-255 pixels without augmentation.
"""

import ml_collections

from spafl_jax.configs import cifar10
from spafl_jax.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset = 'cifar100'
    config.model = 'resnet18'
    config.augment = 'crop_flip'
    config.num_clients = 100
    config.clients_per_round = 10
    config.alpha = 0.1
    config.rounds = 1500
    config.batch_size = 64
    config.local_epochs = 7
    config.lr = 0.01
    config.lr_decay = 0.993
    config.min_lr = 1e-4
    config.clip = 15.0
    config.th_coeff = 7e-4
    config.penalty_warmup = True  # official CIFAR-100 (and FMNIST) only
    if arg == 'official':
        cifar10.apply_official_cifar10(config)
    elif arg:
        raise ValueError(f'cifar100.py takes no argument or "official", got {arg!r}.')
    return config
