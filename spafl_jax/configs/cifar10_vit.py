r"""SpaFL on CIFAR-10 with the ViT (docs/algorithm.md, sections 5-6; the paper's ViT row).

    python experiments/main.py --config=cifar10_vit.py
    python experiments/main.py --config=cifar10_vit.py:official   # the official folder's behaviour

CIFAR-10 is downloaded on first use into data_dir (default ~/.cache/spafl_jax), as for cifar10.py.
`:official` applies the official CIFAR-10 folder's behaviours (the ViT runs on that folder's code):
the `outside_unit` estimator, importance update to all clients after aggregation, a fresh optimizer
each round, raw 0-255 pixels without augmentation.
"""

import ml_collections

from spafl_jax.configs import cifar10


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, '', 'official'):
        raise ValueError(f'cifar10_vit.py takes no argument or "official", got {arg!r}.')
    config = cifar10.get_config(arg)  # the CIFAR-10 split, optimizer and official behaviours
    config.model = 'vit'
    config.local_epochs = 1
    config.th_coeff = 1e-4
    return config
