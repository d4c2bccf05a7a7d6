r"""SpaFL on Fashion-MNIST with LeNet-5: the paper's first setting (docs/algorithm.md, section 6).

    python experiments/main.py --config=fmnist.py
    python experiments/main.py --config=fmnist.py --config.rounds=20 --workdir=/tmp/fmnist
    python experiments/main.py --config=fmnist.py:official   # what the official FMNIST folder does

Data: IDX files in --config.data_dir, the Debian package `dataset-fashion-mnist` (IDX files in
/usr/share/datasets/fashion-mnist) or tfds data prepared in data_dir; otherwise the four published
IDX files are downloaded on first use (30 MB, checked) into data_dir (default ~/.cache/spafl_jax).
"""

import ml_collections

from spafl_jax.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset = 'fashion_mnist'
    config.model = 'lenet5'
    config.num_clients = 100
    config.clients_per_round = 10
    config.alpha = 0.2
    config.rounds = 500
    config.batch_size = 64
    config.local_epochs = 5
    # Tuned on real Fashion-MNIST over the official 500 rounds (RESULTS.md, "Tuning the defaults";
    # the paper: lr 0.001, which `:official` keeps): ten times the paper's learning rate learns in
    # 100 rounds what it takes 200 for; with the paper's penalty it ends at the official code's
    # density (0.36) and 2.4 points above its accuracy, where 2.5 times the penalty falls by round 300.
    config.lr = 0.01
    config.lr_decay = 1.0
    config.clip = 0.0  # the FMNIST folder does not clip
    config.th_coeff = 0.002
    config.penalty_warmup = True
    if arg == 'official':
        apply_official_fmnist(config)
    elif arg:
        raise ValueError(f'fmnist.py takes no argument or "official", got {arg!r}.')
    return config


def apply_official_fmnist(config: ml_collections.ConfigDict) -> None:
    """The behaviour of the official FMNIST folder, where it differs from our defaults."""
    config.lr = 0.001  # the paper's hyperparameters (docs/algorithm.md, section 6)
    config.th_coeff = 0.002
    config.estimator = 'identity'
    config.importance_update = 'sampled_before'
    config.persistent_optimizer = True
    config.raw_pixels = True
    config.drop_last = False  # the official loader trains on each epoch's last partial batch
    config.collapse_check = 'previous'  # resets on the previous forward pass's mask, test included
