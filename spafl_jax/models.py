"""The SpaFL models with the official sizes (SPEC section 5), built from masked layers.

Every model is called as `model.apply(variables, images, train=...)` with NHWC float images and
returns logits. `variables` holds `params`, `thresholds` and, for models with BatchNorm, `batch_stats`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spafl_jax.layers import MaskedConv, MaskedDense


def _batch_norm(train: bool) -> nn.BatchNorm:
    # PyTorch momentum 0.1 is Flax momentum 0.9.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


def _max_pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class DigitsCNN(nn.Module):
    """A small masked CNN for the 8x8 scikit-learn digits: the embedded default."""
    num_classes: int = 10
    estimator: str = 'long_tailed'
    conv_impl: str = 'im2col'
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(MaskedConv, kernel_size=(3, 3), padding='SAME', estimator=self.estimator,
                                                          conv_impl=self.conv_impl, compute_dtype=self.compute_dtype)
        dense = functools.partial(MaskedDense, estimator=self.estimator, compute_dtype=self.compute_dtype)
        x = nn.relu(conv(16)(x))
        x = _max_pool(nn.relu(conv(32)(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(dense(64)(x))
        return dense(self.num_classes)(x)


class LeNet5(nn.Module):
    """LeNet-5 of the official FMNIST folder: 430,500 masked weights, 580 thresholds."""
    num_classes: int = 10
    estimator: str = 'long_tailed'
    conv_impl: str = 'im2col'
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(MaskedConv, kernel_size=(5, 5), padding='VALID', estimator=self.estimator,
                                                          conv_impl=self.conv_impl, compute_dtype=self.compute_dtype)
        dense = functools.partial(MaskedDense, estimator=self.estimator, compute_dtype=self.compute_dtype)
        x = _max_pool(nn.relu(conv(20)(x)))
        x = _max_pool(nn.relu(conv(50)(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(dense(500)(x))
        return dense(self.num_classes)(x)


class Conv4(nn.Module):
    """Conv4 of the official CIFAR-10 folder: 804,800 masked weights, 650 thresholds."""
    num_classes: int = 10
    estimator: str = 'long_tailed'
    conv_impl: str = 'im2col'
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(MaskedConv, kernel_size=(5, 5), padding='VALID', estimator=self.estimator,
                                                          conv_impl=self.conv_impl, compute_dtype=self.compute_dtype)
        dense = functools.partial(MaskedDense, estimator=self.estimator, compute_dtype=self.compute_dtype)
        for i, features in enumerate((64, 64, 128, 128)):
            x = nn.relu(_batch_norm(train)(conv(features)(x)))
            if i % 2 == 1:
                x = _max_pool(x)
        x = x.reshape(x.shape[0], -1)
        for features in (128, 128):
            x = nn.relu(_batch_norm(train)(dense(features)(x)))
        return dense(self.num_classes)(x)


MODELS = {'digits_cnn': DigitsCNN, 'lenet5': LeNet5, 'conv4': Conv4}


def check_model(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f'model={name!r} is not known; allowed values: {", ".join(sorted(MODELS))}.')


def create_model(name: str, num_classes: int, estimator: str = 'long_tailed',
                                  conv_impl: str = 'im2col', compute_dtype: Any = None) -> nn.Module:
    check_model(name)
    return MODELS[name](num_classes=num_classes, estimator=estimator, conv_impl=conv_impl,
                                            compute_dtype=compute_dtype)


def init_variables(model: nn.Module, rng: jax.Array, image_shape) -> dict:
    """Fresh `params`, `thresholds` (all 0) and `batch_stats` (possibly empty) for one client."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    variables = dict(variables)
    variables.pop('macs', None)
    variables.setdefault('batch_stats', {})
    return variables
