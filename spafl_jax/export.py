"""Compact export: a client's structurally sparse model rewritten as a smaller dense one.

SpaFL prunes whole output rows (neurons, filters), so a client's model can be made physically
smaller: drop the pruned rows of a masked layer, the matching input channels of the layer after it and
the matching BatchNorm entries. `compact_model` does that and returns plain arrays plus a JSON-able
description; `compact_apply` (jnp) and `numpy_apply` (numpy only) run it; `save_compact` /
`load_compact` store it as `.npz` + `.json`, and `standalone_source` is a numpy-only module that loads
and runs an export without this package or JAX.

Exactness. A pruned row's pre-activation is exactly 0, but what reaches the next layer is not always 0:
BatchNorm maps 0 to `c = bias - mean * scale / sqrt(var + eps)`, ReLU to `max(c, 0)`, and a max-pool
of a constant channel is that constant. A dropped channel therefore feeds the next layer a constant
per channel. We fold it into the next layer:
  - dense layer (also after a flatten, whose NHWC features are (h, w, c) with c fastest): a bias
    `sum_c W[c, :] * c_c`;
  - VALID conv: the same constant at every output position, a bias `sum_{i,j,c} W[i, j, c, :] * c_c`;
  - padded conv ('SAME' or explicit pads): border outputs see fewer in-image taps, so the
    contribution depends on the position. It is stored as a one-channel `const_kernel`
    `sum_c W[:, :, c, :] * c_c` and added as `conv(ones_image, const_kernel)` — exact for any size.
Everything is exact up to float rounding (sums in a different order); the tests check 1e-5.

Evaluation applies `masking.reset_collapsed_thresholds` before the forward pass, so we do too: the
compact model reproduces `model.apply(eval_variables(variables), x, train=False)`.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import math
import os
import time
from typing import Any
from collections.abc import Sequence

from flax import serialization
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spafl_jax import files
from spafl_jax import masking
from spafl_jax import models
from spafl_jax import xla

FORMAT = 'spafl_compact/1'


# ----------------------------------------------------------------------------------------------------
# The forward pass of a compact model, written once against an array namespace `xp` (numpy or
# jax.numpy). These functions use only `xp`, `math` and each other: `standalone_source` copies them
# into a numpy-only module, so keep JAX out of them.


def _pad_pairs(padding, h, w, kh, kw, sh, sw):
    """((top, bottom), (left, right)) for 'VALID', 'SAME' (TF/XLA rule) or explicit pairs."""
    if padding == 'VALID':
        return ((0, 0), (0, 0))
    if padding == 'SAME':
        out_h, out_w = -(-h // sh), -(-w // sw)
        pad_h = max((out_h - 1) * sh + kh - h, 0)
        pad_w = max((out_w - 1) * sw + kw - w, 0)
        return ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _conv(xp, x, kernel, strides, padding):
    """NHWC x HWIO convolution as shifted slices and one matmul (the masked layers' im2col)."""
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    (top, bottom), (left, right) = _pad_pairs(padding, x.shape[1], x.shape[2], kh, kw, sh, sw)
    if top or bottom or left or right:
        x = xp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    h, w = x.shape[1], x.shape[2]
    out_h, out_w = (h - kh) // sh + 1, (w - kw) // sw + 1
    patches = [
        x[:, i : i + (out_h - 1) * sh + 1 : sh, j : j + (out_w - 1) * sw + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = xp.concatenate(patches, axis=-1) if len(patches) > 1 else patches[0]
    return patches @ kernel.reshape(kh * kw * cin, cout)


def _max_pool(xp, x, window, strides):
    """VALID max-pooling over H and W."""
    wh, ww = window
    sh, sw = strides
    out_h, out_w = (x.shape[1] - wh) // sh + 1, (x.shape[2] - ww) // sw + 1
    out = None
    for i in range(wh):
        for j in range(ww):
            s = x[:, i : i + (out_h - 1) * sh + 1 : sh, j : j + (out_w - 1) * sw + 1 : sw, :]
            out = s if out is None else xp.maximum(out, s)
    return out


def _layer_norm(xp, x, scale, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / xp.sqrt(var + eps) * scale + bias


def _softmax(xp, x):
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _apply_layers(xp, erf, layers, params, x):
    """Runs a list of layer descriptions; `params` maps 'name/param' to arrays."""
    for layer in layers:
        kind, name = layer['type'], layer.get('name', '')
        p = lambda key, name=name: params[name + '/' + key]
        if kind == 'conv':
            y = _conv(xp, x, p('kernel'), layer['strides'], layer['padding'])
            if layer['bias']:
                y = y + p('bias')
            if layer['const_kernel']:
                # Dropped constant input channels under zero padding: a position-dependent bias.
                ones = xp.ones((1, x.shape[1], x.shape[2], 1), y.dtype)
                y = y + _conv(xp, ones, p('const_kernel'), layer['strides'], layer['padding'])
            x = y
        elif kind == 'dense':
            x = x @ p('kernel')
            if layer['bias']:
                x = x + p('bias')
        elif kind == 'batch_norm':
            x = (x - p('mean')) * (p('scale') / xp.sqrt(p('var') + layer['epsilon'])) + p('bias')
        elif kind == 'layer_norm':
            x = _layer_norm(xp, x, p('scale'), p('bias'), layer['epsilon'])
        elif kind == 'relu':
            x = xp.maximum(x, 0.0)
        elif kind == 'gelu':  # exact (erf) form
            x = 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
        elif kind == 'max_pool':
            x = _max_pool(xp, x, layer['window'], layer['strides'])
        elif kind == 'flatten':
            x = x.reshape(x.shape[0], -1)
        elif kind == 'mean_pool':
            x = x.mean(axis=(1, 2))
        elif kind == 'gather':
            # Kept outputs back to their full positions; pruned outputs are exactly 0.
            zero = xp.zeros(x.shape[:-1] + (1,), x.dtype)
            x = xp.take(xp.concatenate([x, zero], axis=-1), p('index'), axis=-1)
        elif kind == 'preact_block':
            pre = _apply_layers(xp, erf, layer['pre'], params, x)
            shortcut = (
                x
                if layer['shortcut'] is None
                else _apply_layers(xp, erf, layer['shortcut'], params, pre)
            )
            x = _apply_layers(xp, erf, layer['body'], params, pre) + shortcut
        elif kind == 'patch_embed':
            n, h, w, c = x.shape
            s = layer['patch_size']
            x = x.reshape(n, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5)
            x = x.reshape(n, (h // s) * (w // s), s * s * c) @ p('kernel') + p('bias')
        elif kind == 'tokens':
            cls = xp.broadcast_to(p('cls_token'), (x.shape[0], 1, x.shape[-1]))
            x = xp.concatenate([cls, x], axis=1) + p('pos_embedding')
        elif kind == 'transformer_block':
            x = _transformer_block(xp, erf, layer, params, x)
        elif kind == 'take_cls':
            x = x[:, 0]
        else:
            raise ValueError(f'unknown layer type {kind!r} in a compact model description.')
    return x


def _transformer_block(xp, erf, layer, params, x):
    """Pre-norm block with per-head widths `qk_dim` and `v_dim` that may be below the original."""
    name, heads, eps = layer['name'], layer['heads'], layer['epsilon']
    p = lambda key: params[name + '/' + key]  # noqa: E731
    b, t, _ = x.shape
    h = _layer_norm(xp, x, p('norm1/scale'), p('norm1/bias'), eps)
    q = (h @ p('q/kernel')).reshape(b, t, heads, layer['qk_dim'])
    k = (h @ p('k/kernel')).reshape(b, t, heads, layer['qk_dim'])
    v = (h @ p('v/kernel')).reshape(b, t, heads, layer['v_dim'])
    attn = _softmax(xp, xp.einsum('bqhd,bkhd->bhqk', q, k) * layer['scale'])
    o = xp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(b, t, heads * layer['v_dim'])
    x = x + o @ p('attn_out/kernel')
    h = _layer_norm(xp, x, p('norm2/scale'), p('norm2/bias'), eps)
    h = h @ p('mlp1/kernel')
    h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    return x + h @ p('mlp2/kernel')


def load_compact(path_prefix):
    """(description, params) from `path_prefix.json` and `path_prefix.npz` (numpy only)."""
    with open(path_prefix + '.json') as f:
        description = json.load(f)
    with np.load(path_prefix + '.npz') as data:
        params = {key: data[key] for key in data.files}
    return description, params


def numpy_apply(description, params, x):
    """Logits of a compact model with numpy only: float32 NHWC images [batch, h, w, c] in."""
    erf = np.vectorize(math.erf, otypes=[np.float32])
    x = np.asarray(x, np.float32)
    return _apply_layers(np, erf, description['layers'], params, x)


_STANDALONE_FUNCTIONS = (
    _pad_pairs,
    _conv,
    _max_pool,
    _layer_norm,
    _softmax,
    _apply_layers,
    _transformer_block,
    load_compact,
    numpy_apply,
)


def standalone_source() -> str:
    """Source of a numpy-only module with `load_compact` and `numpy_apply`: ship it with an export."""
    header = (
        '"""Runs a SpaFL compact export (.npz + .json) with numpy only.\n\n'
        '    description, params = load_compact("client_000")\n'
        '    logits = numpy_apply(description, params, images)   # float32 NHWC\n"""\n\n'
        'import json\nimport math\n\nimport numpy as np\n\n\n'
    )
    return header + '\n\n'.join(inspect.getsource(f) for f in _STANDALONE_FUNCTIONS)


# ----------------------------------------------------------------------------------------------------
# Saving and the jnp forward.


def save_compact(path_prefix: str, description: dict, params: dict[str, np.ndarray]) -> int:
    """Writes `path_prefix.npz` and `path_prefix.json`; returns the bytes written."""
    directory = os.path.dirname(path_prefix)
    if directory:
        os.makedirs(directory, exist_ok=True)
    arrays = io.BytesIO()
    np.savez(arrays, **{k: np.asarray(v) for k, v in params.items()})
    files.write_atomic(path_prefix + '.npz', arrays.getvalue())
    files.write_atomic(path_prefix + '.json', json.dumps(description, indent=1))
    return os.path.getsize(path_prefix + '.npz') + os.path.getsize(path_prefix + '.json')


def compact_apply(description: dict, params: dict[str, Any], x: jax.Array) -> jax.Array:
    """Logits of a compact model in jax.numpy (jit it with `description` closed over)."""
    return _apply_layers(
        jnp, jax.scipy.special.erf, description['layers'], params, jnp.asarray(x, jnp.float32)
    )


# ----------------------------------------------------------------------------------------------------
# Reduction.


@dataclasses.dataclass(frozen=True)
class CompactModel:
    """A compact model: a JSON-able `description` and its flat `params` ('layer/param' -> array)."""

    description: dict
    params: dict[str, np.ndarray]

    @property
    def num_parameters(self) -> int:
        """Float entries (the int `index` of an output gather is bookkeeping, not a parameter)."""
        return int(sum(v.size for v in self.params.values() if v.dtype.kind == 'f'))


def eval_variables(variables: dict) -> dict:
    """The variables evaluation uses: thresholds after the density-collapse reset."""
    return {
        'params': variables['params'],
        'thresholds': masking.reset_collapsed_thresholds(
            variables['params'], variables['thresholds']
        ),
        'batch_stats': variables.get('batch_stats', {}),
    }


@jax.jit
def _eval_row_masks(params, thresholds):
    """Boolean row masks (shaped like `thresholds`) that evaluation's forward pass uses."""
    thresholds = masking.reset_collapsed_thresholds(params, thresholds)
    return jax.tree.map(masking.hard_row_mask, masking.kernels_of(params, thresholds), thresholds)


def count_parameters(variables: dict) -> int:
    """Weights and BatchNorm statistics of a masked model (thresholds only select rows)."""
    leaves = jax.tree.leaves((variables['params'], variables.get('batch_stats', {})))
    return int(sum(np.size(leaf) for leaf in leaves))


def _flat(tree) -> dict[str, np.ndarray]:
    return {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _padding_json(padding) -> Any:
    if isinstance(padding, str):
        return padding
    if isinstance(padding, (int, np.integer)):
        return [[int(padding)] * 2] * 2
    return [[int(lo), int(hi)] for lo, hi in padding]


class _Builder:
    """Walks one model's layers, tracking which channels of the current tensor are kept.

    `kept[c]` says whether full channel c is present in the compact tensor; a dropped channel holds
    the same value `const[c]` at every position and example (a pruned row after BN/ReLU/pool).
    """

    def __init__(self, model_name: str, variables: dict):
        self.model_name = model_name
        self.p = _flat(variables['params'])
        self.stats = _flat(variables.get('batch_stats', {}))
        # 'layer/threshold' -> the layer's row mask, keyed by 'layer'. One compiled call rather than
        # an eager op (and its compilation) per layer shape.
        masks = _flat(_eval_row_masks(variables['params'], variables['thresholds']))
        self.masks = {path.rsplit('/', 1)[0]: mask for path, mask in masks.items()}
        self.params: dict[str, np.ndarray] = {}
        self.kept = None
        self.const = None
        self.flattened = False

    def reset_channels(self, n: int) -> None:
        self.kept = np.ones(n, bool)
        self.const = np.zeros(n, np.float32)
        self.flattened = False

    def masked(self, name: str, kind: str, drop_out: bool, strides=(1, 1), padding='VALID') -> dict:
        """A masked conv/dense layer: inputs reduced to `kept` (constants folded), outputs reduced to
        the kept rows when `drop_out` (else pruned rows stay as zero columns)."""
        mask = self.masks[name]
        kernel = self.p[name + '/kernel'] * mask.astype(np.float32)
        kept_in, const_in = self.kept, self.const
        if self.flattened:  # NHWC flatten: feature (h, w, c) has index (h * W + w) * C + c
            channels = kept_in.shape[0]
            if kernel.shape[0] % channels:
                raise ValueError(
                    f'{name}: {kernel.shape[0]} inputs are not a flattened map of '
                    f'{channels} channels.'
                )
            kept_in = np.tile(kept_in, kernel.shape[0] // channels)
            const_in = np.tile(const_in, kernel.shape[0] // channels)
        if kept_in.shape[0] != kernel.shape[-2]:
            raise ValueError(
                f'{name}: kernel has {kernel.shape[-2]} inputs, the tensor before it '
                f'{kept_in.shape[0]} channels; the export plan does not match the model.'
            )
        out_idx = np.flatnonzero(mask) if drop_out else np.arange(mask.shape[0])
        dropped = ~kept_in & (const_in != 0)
        contribution = None
        if dropped.any():
            contribution = np.tensordot(
                kernel[..., dropped, :].astype(np.float64),
                const_in[dropped].astype(np.float64),
                axes=([kernel.ndim - 2], [0]),
            )[..., out_idx]
        self.params[name + '/kernel'] = np.ascontiguousarray(kernel[..., kept_in, :][..., out_idx])
        layer = {
            'type': kind,
            'name': name,
            'in_features': int(kept_in.sum()),
            'features': int(out_idx.size),
            'full_features': int(mask.shape[0]),
            'bias': False,
        }
        if kind == 'conv':
            padding = _padding_json(padding)
            unpadded = padding == 'VALID' or (
                not isinstance(padding, str) and not any(map(any, padding))
            )
            layer.update(
                kernel_size=list(kernel.shape[:2]),
                strides=list(strides),
                padding=padding,
                const_kernel=False,
            )
            if contribution is not None and unpadded:
                layer['bias'] = True
                self.params[name + '/bias'] = contribution.sum(axis=(0, 1)).astype(np.float32)
            elif contribution is not None:
                layer['const_kernel'] = True
                self.params[name + '/const_kernel'] = contribution[:, :, None, :].astype(np.float32)
        elif contribution is not None:
            layer['bias'] = True
            self.params[name + '/bias'] = contribution.astype(np.float32)
        self.kept = mask.copy() if drop_out else np.ones(mask.shape[0], bool)
        self.const = np.zeros(mask.shape[0], np.float32)
        self.flattened = False
        return layer

    def batch_norm(self, name: str, epsilon: float = 1e-5) -> dict:
        scale, bias = self.p[name + '/scale'], self.p[name + '/bias']
        mean, var = self.stats[name + '/mean'], self.stats[name + '/var']
        # Flax's eval BatchNorm, applied to the constants of dropped channels.
        mul = scale / np.sqrt(var + np.float32(epsilon))
        self.const = np.where(self.kept, 0.0, (self.const - mean) * mul + bias).astype(np.float32)
        for key, value in (('scale', scale), ('bias', bias), ('mean', mean), ('var', var)):
            self.params[f'{name}/{key}'] = value[self.kept]
        return {
            'type': 'batch_norm',
            'name': name,
            'features': int(self.kept.sum()),
            'epsilon': epsilon,
        }

    def relu(self) -> dict:
        self.const = np.maximum(self.const, 0.0)
        return {'type': 'relu'}

    def max_pool(self) -> dict:
        return {'type': 'max_pool', 'window': [2, 2], 'strides': [2, 2]}  # constant stays constant

    def flatten(self) -> dict:
        self.flattened = True
        return {'type': 'flatten'}

    def output_gather(self, full: int) -> list[dict]:
        """Pruned logits are exactly 0: compute the kept ones and put them back in place."""
        if self.kept.all():
            return []
        index = np.full(full, self.kept.sum(), np.int32)
        index[self.kept] = np.arange(self.kept.sum())
        self.params['output/index'] = index
        return [{'type': 'gather', 'name': 'output', 'features': full}]

    def check_not_all_pruned(self, name: str) -> None:
        mask = self.masks[name]
        if not mask.any():
            raise ValueError(
                f'{self.model_name}: all {mask.shape[0]} rows of masked layer {name!r} are pruned, '
                'even after the density-collapse reset (so its kernel rows are exactly zero). Its '
                'output no longer depends on the input, so the model outputs the same constant '
                'logits for every image: there is no network to export for this client.'
            )


def _sequential(b: _Builder, plan) -> list[dict]:
    """`models.SequentialNet.LAYERS`: every masked layer loses its pruned rows, the last one
    included (outputs gathered back)."""
    masked = [op for op in plan if op[0] in ('conv', 'dense')]
    layers = []
    b.reset_channels(b.p[masked[0][1] + '/kernel'].shape[-2])
    for op in plan:
        if op[0] in ('conv', 'dense'):
            b.check_not_all_pruned(op[1])
            padding = op[4] if op[0] == 'conv' else 'VALID'
            layers.append(b.masked(op[1], op[0], drop_out=True, padding=padding))
        elif op[0] == 'batch_norm':
            layers.append(b.batch_norm(op[1]))
        else:
            layers.append(getattr(b, op[0])())
    return layers + b.output_gather(b.p[masked[-1][1] + '/kernel'].shape[-1])


def _resnet18(b: _Builder, plan: dict) -> list[dict]:
    """Pre-activation ResNet: only the rows internal to a block are dropped.

    The residual stream `x + f(x)` needs its full width: a pruned row of a conv that writes into it
    (stem, a block's conv2, a 1x1 shortcut) is a zero channel of that conv, but the same channel of
    the sum carries the other branch and the earlier blocks, so those rows stay (as zero columns). A
    block's conv1 is internal: its pruned rows, the matching bn2 entries and conv2's input
    channels are dropped; after BN and ReLU a dropped channel is a constant, which conv2 (padding 1,
    so border outputs see fewer taps) receives through a `const_kernel`. A block whose conv1 is
    entirely pruned keeps working: conv2 then sees only constants. The head is not masked.
    """
    layers = []
    b.reset_channels(b.p['stem/kernel'].shape[-2])
    layers.append(b.masked('stem', 'conv', drop_out=False, padding=1))
    layers += [b.batch_norm('stem_bn'), b.relu()]
    for stage in range(plan['stages']):
        for index in range(plan['blocks_per_stage']):
            name = f'stage{stage + 1}_block{index + 1}'
            s = (2, 2) if stage > 0 and index == 0 else (1, 1)
            width = b.kept.shape[0]
            pre = [b.batch_norm(f'{name}/bn1'), b.relu()]
            shortcut = None
            if name + '/shortcut/kernel' in b.p:
                shortcut = [
                    b.masked(f'{name}/shortcut', 'conv', drop_out=False, strides=s, padding=0)
                ]
                b.reset_channels(width)
            body = [
                b.masked(f'{name}/conv1', 'conv', drop_out=True, strides=s, padding=1),
                b.batch_norm(f'{name}/bn2'),
                b.relu(),
                b.masked(f'{name}/conv2', 'conv', drop_out=False, padding=1),
            ]
            layers.append(
                {
                    'type': 'preact_block',
                    'name': name,
                    'pre': pre,
                    'shortcut': shortcut,
                    'body': body,
                }
            )
    layers.append({'type': 'mean_pool'})
    for key in ('kernel', 'bias'):
        b.params['head/' + key] = b.p['head/' + key]
    layers.append(
        {
            'type': 'dense',
            'name': 'head',
            'in_features': int(b.p['head/kernel'].shape[0]),
            'features': int(b.p['head/kernel'].shape[1]),
            'bias': True,
        }
    )
    return layers


def _head_order(alive: np.ndarray) -> tuple[np.ndarray, int]:
    """Per head, the dims to keep: alive ones first, padded with dead ones to a common width."""
    width = int(alive.sum(axis=1).max())
    order = np.argsort(~alive, axis=1, kind='stable')[:, :width]
    return order, width


def _vit(b: _Builder, plan: dict) -> list[dict]:
    """ViT: attention and MLP widths shrink inside a block, the residual width (dim) does not.

    The token stream `x + attn(x)`, `x + mlp(x)` needs its full width, so pruned rows of attn_out and
    mlp2 stay (zero columns). Inside a block: a dim d of a head contributes q_d * k_d to the logits,
    exactly 0 when either the q row or the k row is pruned, so d is dropped from both; a pruned v row
    gives a zero output dim, so it is dropped with the matching attn_out input rows; a pruned mlp1
    row gives gelu(0) = 0, so it is dropped with the matching mlp2 input rows. Attention needs the
    same width in every head: heads are padded to the widest with dims whose product (or v) is exactly
    0. The logit scale stays 1/sqrt(original head_dim). Nothing here depends on a constant, so an
    entirely pruned internal layer is simply of width 0.
    """
    heads, head_dim = plan['heads'], plan['head_dim']  # not recoverable from the shapes
    inner = heads * head_dim
    eps = 1e-5
    copy = lambda *keys: b.params.update({k: b.p[k] for k in keys})  # noqa: E731
    copy('patch_embedding/kernel', 'patch_embedding/bias', 'cls_token', 'pos_embedding')
    b.params['tokens/cls_token'] = b.params.pop('cls_token')
    b.params['tokens/pos_embedding'] = b.params.pop('pos_embedding')
    layers = [
        {'type': 'patch_embed', 'name': 'patch_embedding', 'patch_size': plan['patch_size']},
        {'type': 'tokens', 'name': 'tokens'},
    ]
    for depth in range(1, plan['depth'] + 1):
        name = f'block{depth}'
        mask = b.masks[f'{name}/qkv']
        kernel = b.p[f'{name}/qkv/kernel'] * mask.astype(np.float32)
        dim = kernel.shape[0]
        q, k, v = (
            kernel[:, i * inner : (i + 1) * inner].reshape(dim, heads, head_dim) for i in range(3)
        )
        mq, mk, mv = (mask[i * inner : (i + 1) * inner].reshape(heads, head_dim) for i in range(3))
        qk_order, qk_dim = _head_order(mq & mk)
        v_order, v_dim = _head_order(mv)
        pick = lambda w, order, dim=dim: np.stack(
            [w[:, h, order[h]] for h in range(heads)], axis=1
        ).reshape(dim, -1)
        attn_out = b.p[f'{name}/attn_out/kernel'] * b.masks[f'{name}/attn_out'].astype(np.float32)
        attn_out = attn_out.reshape(heads, head_dim, -1)
        mlp_mask = b.masks[f'{name}/mlp1']
        mlp2 = b.p[f'{name}/mlp2/kernel'] * b.masks[f'{name}/mlp2'].astype(np.float32)
        b.params.update(
            {
                f'{name}/q/kernel': pick(q, qk_order),
                f'{name}/k/kernel': pick(k, qk_order),
                f'{name}/v/kernel': pick(v, v_order),
                f'{name}/attn_out/kernel': np.concatenate(
                    [attn_out[h, v_order[h]] for h in range(heads)], axis=0
                ).reshape(heads * v_dim, attn_out.shape[-1]),
                f'{name}/mlp1/kernel': b.p[f'{name}/mlp1/kernel'][:, mlp_mask],
                f'{name}/mlp2/kernel': mlp2[mlp_mask],
            }
        )
        for norm in ('norm1', 'norm2'):
            copy(f'{name}/{norm}/scale', f'{name}/{norm}/bias')
        layers.append(
            {
                'type': 'transformer_block',
                'name': name,
                'heads': heads,
                'qk_dim': qk_dim,
                'v_dim': v_dim,
                'mlp_dim': int(mlp_mask.sum()),
                'dim': dim,
                'scale': float(head_dim**-0.5),
                'epsilon': eps,
            }
        )
    copy('norm/scale', 'norm/bias', 'head/kernel', 'head/bias')
    layers += [
        {'type': 'take_cls'},
        {'type': 'layer_norm', 'name': 'norm', 'epsilon': eps},
        {
            'type': 'dense',
            'name': 'head',
            'in_features': int(b.p['head/kernel'].shape[0]),
            'features': int(b.p['head/kernel'].shape[1]),
            'bias': True,
        },
    ]
    return layers


SUPPORTED_MODELS = ('digits_cnn', 'lenet5', 'conv4', 'resnet18', 'vit')
_EXPORTERS = {'sequential': _sequential, 'preact_resnet': _resnet18, 'vit': _vit}


def compact_model(model: nn.Module | str, variables: dict) -> CompactModel:
    """The compact equivalent of one client's masked model.

    Args:
      model: the model, or a key of `models.MODELS` (its default sizes); the model's
        `export_plan()`, declared beside its definition, says what to walk.
      variables: ONE client's {'params', 'thresholds', 'batch_stats'} (no client axis).
    Returns:
      A `CompactModel` whose `compact_apply(description, params, x)` equals
      `model.apply(eval_variables(variables), x, train=False)` to float tolerance on any input.
    Raises:
      ValueError: an unknown model, or (sequential models) a masked layer with every row pruned,
        whose output is then a constant.
    """
    if isinstance(model, str):
        if model not in SUPPORTED_MODELS:
            raise ValueError(
                f'model={model!r}: compact export supports {", ".join(SUPPORTED_MODELS)}.'
            )
        model = models.create_model(model, 10)
    name = next((k for k, cls in models.MODELS.items() if type(model) is cls), type(model).__name__)
    if not hasattr(model, 'export_plan'):
        raise ValueError(
            f'{type(model).__name__} declares no export_plan(); compact export '
            f'supports {", ".join(SUPPORTED_MODELS)}.'
        )
    kind, plan = model.export_plan()
    b = _Builder(name, variables)
    layers = _EXPORTERS[kind](b, plan)
    params = {k: np.ascontiguousarray(v) for k, v in b.params.items()}
    description = {'format': FORMAT, 'model': name, 'layers': layers}
    return CompactModel(description=description, params=params)


# ----------------------------------------------------------------------------------------------------
# Workdirs: every client of a run, exported and timed.

IMAGE_SHAPES = {
    'digits': (8, 8, 1),
    'fashion_mnist': (28, 28, 1),
    'cifar10': (32, 32, 3),
    'cifar100': (32, 32, 3),
}
STATE_FILE = 'final_state.msgpack'


def load_client_variables(workdir: str) -> tuple[str, list[dict]]:
    """(model name, one variables dict per client) from a run's workdir.

    Contract with the runner: `workdir/config.json` has at least 'model' and 'num_clients';
    `workdir/final_state.msgpack` is `flax.serialization.msgpack_serialize(jax.tree.map(np.asarray,
    {'params': ..., 'thresholds': ..., 'batch_stats': ...}))` with a leading client axis
    `[num_clients, ...]` on every leaf.
    """
    with open(os.path.join(workdir, 'config.json')) as f:
        config = json.load(f)
    with open(os.path.join(workdir, STATE_FILE), 'rb') as f:
        state = serialization.msgpack_restore(f.read())
    missing = {'params', 'thresholds'} - set(state)
    if missing:
        raise ValueError(
            f'{workdir}/{STATE_FILE} lacks {sorted(missing)}; expected params, '
            'thresholds and batch_stats stacked over clients.'
        )
    state = {
        'params': state['params'],
        'thresholds': state['thresholds'],
        'batch_stats': state.get('batch_stats') or {},
    }
    num_clients = int(config['num_clients'])
    for leaf in jax.tree.leaves(state):
        if np.shape(leaf)[0] != num_clients:
            raise ValueError(
                f'{workdir}/{STATE_FILE}: a leaf of shape {np.shape(leaf)} has no leading '
                f'axis of num_clients={num_clients}.'
            )
    clients = [jax.tree.map(lambda a, i=i: np.asarray(a[i]), state) for i in range(num_clients)]
    return config['model'], clients


def image_shape_of(config: dict) -> tuple[int, int, int]:
    if 'image_shape' in config:
        return tuple(config['image_shape'])
    if config.get('dataset') not in IMAGE_SHAPES:
        raise ValueError(
            f'dataset={config.get("dataset")!r}: no known image shape; add '
            '"image_shape" to config.json.'
        )
    return IMAGE_SHAPES[config['dataset']]


def output_features(description: dict) -> int:
    return int(description['layers'][-1]['features'])


def time_forwards(fns_and_args, repeats: int = 20) -> list[float]:
    """Median seconds of one call of each jitted `fn(*args)`, compilation and warm-up excluded.

    The calls alternate between the functions, so load changes on a shared machine hit both alike
    and their ratio is measured in one run.
    """
    for fn, args in fns_and_args:
        jax.block_until_ready(fn(*args))  # compile
        jax.block_until_ready(fn(*args))  # warm-up
    times = [[] for _ in fns_and_args]
    for _ in range(repeats):
        for t, (fn, args) in zip(times, fns_and_args):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            t.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def export_workdir(
    workdir: str,
    out_dir: str,
    *,
    batch_size: int = 256,
    repeats: int = 20,
    seed: int = 0,
    loader=load_client_variables,
    clients: Sequence[int] | None = None,
) -> list[dict]:
    """Exports every client of a run (or the ids in `clients`) to `out_dir/client_XXX.{npz,json}`
    and times both models.

    Returns one row per client: parameters before/after, bytes on disk, median jitted forward time of
    the masked and the compact model on the same random batch, their ratio, and the largest
    |logit difference| (a check of exactness on that batch). A client that cannot be exported (a
    layer entirely pruned) gets an 'error' entry instead.
    """
    with open(os.path.join(workdir, 'config.json')) as f:
        config = json.load(f)
    model_name, all_clients = loader(workdir)
    if clients is None:
        clients = range(len(all_clients))
    unknown = sorted(set(clients) - set(range(len(all_clients))))
    if unknown:
        raise ValueError(
            f'clients {unknown} are not in the run; it has clients 0..{len(all_clients) - 1}.'
        )
    image_shape = image_shape_of(config)
    os.makedirs(out_dir, exist_ok=True)
    files.write_atomic(os.path.join(out_dir, 'compact_numpy.py'), standalone_source())
    x = jax.random.normal(jax.random.key(seed), (batch_size, *image_shape), jnp.float32)
    rows = []
    model = masked_fn = None
    for i in clients:
        variables = all_clients[i]
        row = {'client': i, 'params_before': count_parameters(variables)}
        try:
            compact = compact_model(model_name, variables)
        except ValueError as e:
            rows.append({**row, 'error': str(e)})
            continue
        if model is None:
            model = models.create_model(
                model_name,
                output_features(compact.description),
                conv_impl=config.get('conv_impl', 'auto'),
            )
            # Both forwards compile with the options training used (`xla.jit`).
            # `model` is built once, in the first iteration, and never rebound.
            masked_fn = xla.jit(
                lambda v, images: model.apply(v, images, train=False),  # noqa: B023
                model=model,
            )
        prefix = os.path.join(out_dir, f'client_{i:03d}')
        row['bytes'] = save_compact(prefix, compact.description, compact.params)
        row['params_after'] = compact.num_parameters
        ev = jax.device_put(eval_variables(variables))
        params = jax.device_put(compact.params)
        compact_fn = xla.jit(
            lambda p, images, d=compact.description: compact_apply(d, p, images), model=model
        )
        row['max_abs_diff'] = float(jnp.max(jnp.abs(masked_fn(ev, x) - compact_fn(params, x))))
        row['masked_s'], row['compact_s'] = time_forwards(
            [(masked_fn, (ev, x)), (compact_fn, (params, x))], repeats
        )
        row['speedup'] = row['masked_s'] / row['compact_s']
        rows.append(row)
    return rows
