"""The per-architecture builders of a compact export (`build`, used by `export.compact_model`):
`_Builder` drops a masked layer's pruned rows and folds the constants of dropped channels into the
next layer, and `_sequential`, `_resnet18` and `_vit` walk each model's `export_plan()` with it.
"""

from __future__ import annotations

from typing import Any

from flax import traverse_util
import jax
import numpy as np

from spafl_jax import masking


@jax.jit
def _eval_row_masks(params, thresholds):
    """Boolean row masks (shaped like `thresholds`) that evaluation's forward pass uses."""
    thresholds = masking.reset_collapsed_thresholds(params, thresholds)
    return jax.tree.map(masking.hard_row_mask, masking.kernels_of(params, thresholds), thresholds)


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


def _vit_block(b: _Builder, name: str, heads: int, head_dim: int, eps: float) -> dict:
    """One transformer block of `_vit`: its q/k/v, attn_out and MLP kernels narrowed in `b.params`."""
    inner = heads * head_dim
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
        for key in (f'{name}/{norm}/scale', f'{name}/{norm}/bias'):
            b.params[key] = b.p[key]
    return {
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
        layers.append(_vit_block(b, f'block{depth}', heads, head_dim, eps))
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


_EXPORTERS = {'sequential': _sequential, 'preact_resnet': _resnet18, 'vit': _vit}


def build(
    model_name: str, variables: dict, kind: str, plan: Any
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The layer descriptions and the params of one client's compact model, walked by the builder
    of `kind` (an `export_plan()` kind) over `plan`."""
    b = _Builder(model_name, variables)
    layers = _EXPORTERS[kind](b, plan)
    return layers, b.params
