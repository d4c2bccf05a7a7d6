"""The forward pass of a compact model (`export.compact_model`), written once against an array
namespace: `compact_apply` (jax.numpy), `numpy_apply` (numpy only), `save_compact` / `load_compact`
(`.npz` + `.json`), and `standalone_source`, a numpy-only module that runs an export without JAX.
"""

from __future__ import annotations

import inspect
import io
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spafl_jax import files

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
