"""The SpaFL models with the official sizes (docs/algorithm.md, section 5), built from masked layers.

Every model is called as `model.apply(variables, images, train=...)` with NHWC float images and
returns logits. `variables` holds `params`, `thresholds` and, for models with BatchNorm, `batch_stats`.
Unmasked layers (heads, embeddings, norms) follow PyTorch's defaults so that runs compare with the
official code.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from spafl_jax import hardware
from spafl_jax.layers import MaskedConv, MaskedDense, channel_axis
from spafl_jax.model_parts import (  # noqa: F401 (re-exported: models.BatchNorm, ...)
    BatchNorm,
    MaskedNet,
    _batch_norm,
    _torch_bias_init,
    _torch_dense,
    max_pool_2x2,
)


class SequentialNet(MaskedNet):
    """A masked network that is a sequence of named layers, declared once in `LAYERS`: `__call__`
    runs it, and the compact export (`export.py`) and HeteroFL's width slicing walk it, so none of
    them can drift from the others. The ops, in network order:

      ('conv', name, features, kernel_size, padding)   a masked conv, stride 1
      ('dense', name, features)                        a masked dense layer; features None: the
                                                       model's `num_classes`
      ('batch_norm', name)   ('relu',)   ('max_pool',) (2x2, stride 2)   ('flatten',) (NHWC order)
    """

    LAYERS: ClassVar[tuple] = ()

    def export_plan(self) -> tuple:
        """What `export.compact_model` walks: ('sequential', LAYERS)."""
        return 'sequential', self.LAYERS

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv, dense = self.masked_layers()
        x = self.from_nhwc(x)
        flat = False
        ops = list(self.LAYERS)
        i = 0
        while i < len(ops):
            op = ops[i]
            if op[0] == 'conv':
                _, name, features, size, padding = op
                x = conv(features, kernel_size=(size, size), padding=padding, name=name)(x)
            elif op[0] == 'dense':
                x = dense(op[2] or self.num_classes, name=op[1])(x)
            elif op[0] == 'batch_norm':
                x = _batch_norm(train, -1 if flat else channel_axis(self.layout), name=op[1])(x)
            elif op[0] == 'relu':
                if i + 1 < len(ops) and ops[i + 1][0] == 'max_pool':
                    x, i = self.pool(x), i + 1  # pool(relu(.)) = relu(pool(.)): 4x fewer ReLUs
                x = nn.relu(x)
            elif op[0] == 'max_pool':
                x = self.pool(x)
            elif op[0] == 'flatten':
                x, flat = self.flatten(x), True
            else:
                raise ValueError(f'{type(self).__name__}.LAYERS: unknown op {op!r}.')
            i += 1
        return x


class DigitsCNN(SequentialNet):
    """A small masked CNN for the 8x8 scikit-learn digits: the embedded default."""

    LAYERS: ClassVar[tuple] = (
        ('conv', 'conv1', 16, 3, 'SAME'),
        ('relu',),
        ('conv', 'conv2', 32, 3, 'SAME'),
        ('relu',),
        ('max_pool',),
        ('flatten',),
        ('dense', 'fc1', 64),
        ('relu',),
        ('dense', 'fc2', None),
    )


class DigitsMLP(SequentialNet):
    """A masked 64-32-10 MLP for the digits: 2,368 masked weights, about 10 kB a client, the
    model of the million-client benchmark (research/benchmarks/scale.py)."""

    LAYERS: ClassVar[tuple] = (
        ('flatten',),
        ('dense', 'fc1', 32),
        ('relu',),
        ('dense', 'fc2', None),
    )


class LeNet5(SequentialNet):
    """LeNet-5 of the official FMNIST folder: 430,500 masked weights, 580 thresholds."""

    LAYERS: ClassVar[tuple] = (
        ('conv', 'conv1', 20, 5, 'VALID'),
        ('relu',),
        ('max_pool',),
        ('conv', 'conv2', 50, 5, 'VALID'),
        ('relu',),
        ('max_pool',),
        ('flatten',),
        ('dense', 'fc1', 500),
        ('relu',),
        ('dense', 'fc2', None),
    )


class Conv4(SequentialNet):
    """Conv4 of the official CIFAR-10 folder: 804,800 masked weights, 650 thresholds."""

    LAYERS: ClassVar[tuple] = (
        ('conv', 'conv1', 64, 5, 'VALID'),
        ('batch_norm', 'bn1'),
        ('relu',),
        ('conv', 'conv2', 64, 5, 'VALID'),
        ('batch_norm', 'bn2'),
        ('relu',),
        ('max_pool',),
        ('conv', 'conv3', 128, 5, 'VALID'),
        ('batch_norm', 'bn3'),
        ('relu',),
        ('conv', 'conv4', 128, 5, 'VALID'),
        ('batch_norm', 'bn4'),
        ('relu',),
        ('max_pool',),
        ('flatten',),
        ('dense', 'fc1', 128),
        ('batch_norm', 'bn5'),
        ('relu',),
        ('dense', 'fc2', 128),
        ('batch_norm', 'bn6'),
        ('relu',),
        ('dense', 'fc3', None),
    )


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus a shortcut.

    Where width or stride change, the shortcut is a masked 1x1 conv (stride) applied, as in the
    common PyTorch PreActResNet, to the block's first pre-activation rather than to the raw input.
    """

    features: int
    strides: int = 1
    estimator: str = 'long_tailed'
    conv_impl: str = 'xla'
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(
            MaskedConv,
            estimator=self.estimator,
            conv_impl=self.conv_impl,
            compute_dtype=self.compute_dtype,
        )
        s = (self.strides, self.strides)
        out = nn.relu(_batch_norm(train, name='bn1')(x))
        if self.strides != 1 or x.shape[-1] != self.features:
            # PyTorch padding=0 for the 1x1 projection.
            shortcut = conv(
                self.features, kernel_size=(1, 1), strides=s, padding=0, name='shortcut'
            )(out)
        else:
            shortcut = x
        # PyTorch padding=1: symmetric, unlike 'SAME' with stride 2 on even inputs.
        out = conv(self.features, kernel_size=(3, 3), strides=s, padding=1, name='conv1')(out)
        out = nn.relu(_batch_norm(train, name='bn2')(out))
        out = conv(self.features, kernel_size=(3, 3), strides=(1, 1), padding=1, name='conv2')(out)
        return out + shortcut


class ResNet18(MaskedNet):
    """Half-width pre-activation ResNet-18 of the official CIFAR-100 folder.

    Every conv (stem, block convs, 1x1 shortcuts) is masked: 2,790,240 masked weights, 2,400
    thresholds. The final Linear is not masked, and there is no BatchNorm after the last block.
    """

    num_classes: int = 100
    widths: tuple[int, ...] = (32, 64, 128, 256)
    blocks_per_stage: int = 2

    def export_plan(self) -> tuple:
        """What `export.compact_model` walks: the stem, the blocks by their names, the head."""
        return 'preact_resnet', {
            'stages': len(self.widths),
            'blocks_per_stage': self.blocks_per_stage,
        }

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.layout != 'NHWC':
            raise ValueError(f'ResNet18 runs in the NHWC layout only; got layout={self.layout!r}.')
        block = functools.partial(
            PreActBlock,
            estimator=self.estimator,
            conv_impl=self.conv_impl,
            compute_dtype=self.compute_dtype,
        )
        conv, _ = self.masked_layers()
        x = conv(self.widths[0], kernel_size=(3, 3), padding=1, name='stem')(x)
        x = nn.relu(_batch_norm(train, name='stem_bn')(x))
        for stage, features in enumerate(self.widths):
            for b in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and b == 0 else 1
                x = block(features, strides, name=f'stage{stage + 1}_block{b + 1}')(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return _torch_dense(self.num_classes, x.shape[-1], name='head')(x)


class TransformerBlock(nn.Module):
    """Pre-norm encoder block: x + Attn(LN(x)), then x + MLP(LN(x)); qkv, attention-out and both
    MLP layers are masked (no bias), the LayerNorms are not."""

    dim: int = 128
    heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 256
    estimator: str = 'long_tailed'
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(
            MaskedDense, estimator=self.estimator, compute_dtype=self.compute_dtype
        )
        batch, tokens, _ = x.shape
        inner = self.heads * self.head_dim

        h = nn.LayerNorm(epsilon=1e-5, name='norm1')(x)
        qkv = dense(3 * inner, name='qkv')(h)
        q, k, v = jnp.split(qkv.reshape(batch, tokens, 3, self.heads, self.head_dim), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [batch, tokens, heads, head_dim]
        logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * self.head_dim**-0.5
        attn = jax.nn.softmax(logits, axis=-1)
        h = jnp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(batch, tokens, inner)
        x = x + dense(self.dim, name='attn_out')(h)

        h = nn.LayerNorm(epsilon=1e-5, name='norm2')(x)
        # PyTorch's nn.GELU is the exact (erf) form.
        h = nn.gelu(dense(self.mlp_dim, name='mlp1')(h), approximate=False)
        return x + dense(self.dim, name='mlp2')(h)


class ViT(MaskedNet):
    """ViT of the official CIFAR-10 folder: patch 4, dim 128, depth 6, 8 heads of 64, MLP 256.

    Masked: qkv, attention-out and both MLP layers of every block (1,966,080 weights, 12,288
    thresholds). Unmasked: the patch embedding, cls token, position embedding, LayerNorms and head.
    Dropout is 0 in the official configuration, so there is none.
    """

    # `conv_impl` is unused: the ViT has no masked conv.
    patch_size: int = 4
    dim: int = 128
    depth: int = 6
    heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 256

    def export_plan(self) -> tuple:
        """What `export.compact_model` walks: the blocks, with the head sizes (which the shapes of
        the weights do not determine)."""
        return 'vit', {
            'depth': self.depth,
            'heads': self.heads,
            'head_dim': self.head_dim,
            'patch_size': self.patch_size,
        }

    @nn.compact
    def __call__(self, x, train: bool = False):
        batch, height, width, channels = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f'image {height}x{width} is not divisible into {p}x{p} patches.')
        # Non-overlapping patches flattened as (row, col, channel): a linear embedding, i.e. a
        # stride-p conv, without the conv.
        patches = x.reshape(batch, height // p, p, width // p, p, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, p * p * channels)
        tokens = _torch_dense(self.dim, p * p * channels, name='patch_embedding')(patches)

        # torch.randn initialisation, as in the vit-pytorch code the official folder uses.
        cls = self.param('cls_token', nn.initializers.normal(1.0), (1, 1, self.dim), jnp.float32)
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.dim)), tokens], axis=1)
        pos = self.param(
            'pos_embedding',
            nn.initializers.normal(1.0),
            (1, tokens.shape[1], self.dim),
            jnp.float32,
        )
        tokens = tokens + pos

        for i in range(self.depth):
            tokens = TransformerBlock(
                self.dim,
                self.heads,
                self.head_dim,
                self.mlp_dim,
                estimator=self.estimator,
                compute_dtype=self.compute_dtype,
                name=f'block{i + 1}',
            )(tokens)
        cls_out = nn.LayerNorm(epsilon=1e-5, name='norm')(tokens[:, 0])
        return _torch_dense(self.num_classes, self.dim, name='head')(cls_out)


MODELS = {
    'digits_cnn': DigitsCNN,
    'digits_mlp': DigitsMLP,
    'lenet5': LeNet5,
    'conv4': Conv4,
    'resnet18': ResNet18,
    'vit': ViT,
}


def check_model(name: str) -> None:
    if name not in MODELS:
        raise ValueError(
            f'model={name!r} is not known; allowed values: {", ".join(sorted(MODELS))}.'
        )


CONV_IMPLS = ('auto', 'im2col', 'xla')  # 'auto': the backend's (`hardware.specialize`)


def create_model(
    name: str,
    num_classes: int,
    *,
    estimator: str = 'long_tailed',
    conv_impl: str = 'auto',
    compute_dtype: Any = None,
    backend: str | None = None,
) -> nn.Module:
    """Model `name` of `MODELS`, with the settings that run fastest on `backend` (default: JAX's;
    `hardware.specialize`, which reads the backend so that these modules never do); `conv_impl`
    other than 'auto' overrides the backend's choice of convolution. What it computes does not
    depend on them."""
    check_model(name)
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f'conv_impl={conv_impl!r}: use one of {", ".join(CONV_IMPLS)}.')
    model = hardware.specialize(
        MODELS[name](num_classes=num_classes, estimator=estimator, compute_dtype=compute_dtype),
        backend,
    )
    return model if conv_impl == 'auto' else model.clone(conv_impl=conv_impl)


def init_variables(model: nn.Module, rng: jax.Array, image_shape) -> dict:
    """Fresh `params`, `thresholds` (all 0) and `batch_stats` (possibly empty) for one client.

    Compiled once per (model, image shape) and cached: Flax's `init` runs the forward pass, which
    op by op costs seconds even for the digits CNN.
    """
    return _init_variables(model, rng, tuple(int(d) for d in image_shape))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_variables(model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...]) -> dict:
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    variables = dict(variables)
    variables.pop('macs', None)
    variables.setdefault('batch_stats', {})
    return variables
