r"""SpaFL on CIFAR-10 with the ViT (SPEC sections 5-6; the paper's ViT row).

    python experiments/main.py --config=cifar10_vit.py --config.data_dir=~/tensorflow_datasets
    python experiments/main.py --config=cifar10_vit.py:official --config.data_dir=...  # official

CIFAR-10 comes from tensorflow-datasets data prepared in data_dir (array_record format; see README).
`:official` applies the official CIFAR-10 folder's behaviours (the ViT runs on that folder's code):
the `outside_unit` estimator, importance update to all clients after aggregation, a fresh optimizer
each round, raw 0-255 pixels without augmentation.
"""

import ml_collections

from experiments.configs import cifar10
from experiments.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset = 'cifar10'
    config.model = 'vit'
    config.augment = 'crop_flip'
    config.num_clients = 100
    config.clients_per_round = 10
    config.alpha = 0.1
    config.rounds = 500
    config.batch_size = 16
    config.local_epochs = 1
    config.lr = 0.01
    config.lr_decay = 1.0
    config.clip = 3.0
    config.th_coeff = 1e-4
    config.penalty_warmup = False
    config.eval_batch_size = 500
    if arg == 'official':
        cifar10.apply_official_cifar10(config)
    elif arg:
        raise ValueError(f'cifar10_vit.py takes no argument or "official", got {arg!r}.')
    return config
