r"""Runs the official SpaFL PyTorch code and records what it computes, for tests/test_reference.py.

Nothing of the official code lives in this repository: this script takes the path of a checkout of
news-vt/SpaFL_NeruIPS_2024, imports its folder's modules at run time, and wraps the official
objects (its server's sampling, its clients' training, testing and importance update, its datasets'
item access) to record them. Small stand-in modules replace what the official folders import and
this machine lacks: torchvision's dataset classes (an IDX reader for Fashion-MNIST, arrays handed in
for CIFAR-10), wandb and matplotlib (no-ops).

It needs PyTorch, in a virtual environment of its own (CI never runs it; the fixtures it writes are
all the tests need):

    python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch==2.13.0 numpy einops
    git clone https://github.com/news-vt/SpaFL_NeruIPS_2024 /tmp/spafl_official   # or a mirror
    # Golden traces (a few rounds on a small subset; see `TRACES`):
    /tmp/torch/bin/python research/official/record_official.py trace \
        --official=/tmp/spafl_official --folder=fmnist --out=tests/reference/fmnist_trace.npz
    /tmp/torch/bin/python research/official/record_official.py trace \
        --official=/tmp/spafl_official --folder=cifar10 --out=tests/reference/cifar10_trace.npz
    /tmp/torch/bin/python research/official/record_official.py trace \
        --official=/tmp/spafl_official --folder=fmnist --th_coeff=0.5 \
        --out=tests/reference/fmnist_collapse_trace.npz
    # A learning curve of the unchanged FMNIST folder on the real data (about 10-30 s a round here):
    /tmp/torch/bin/python research/official/record_official.py curve \
        --official=/tmp/spafl_official --rounds=200 --seed=1 \
        --out=research/results/official_fmnist_seed1
    # Longer than a session: saved every 5 rounds; the same command resumes (bit for bit):
    /tmp/torch/bin/python research/official/record_official.py curve \
        --official=/tmp/spafl_official --rounds=500 --seed=1 --checkpoint=/tmp/official500_seed1.pt \
        --out=research/results/official_fmnist500_seed1

`--official` may also be a bare git mirror (such as the search tool's fetch gives): its HEAD is
extracted to a temporary directory. A curve's directory receives `train_log.txt` (the official log),
`metrics.jsonl` (round counted from 1, accuracy as a fraction, density: the records our runner
writes) and `config.json`.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import types

import numpy as np

FMNIST_DIR = '/usr/share/datasets/fashion-mnist'

# What each golden trace runs: the official folder's own semantics, on little data.
TRACES = {
    'fmnist': dict(
        num_clients=6,
        schedulingsize=3,
        comm_rounds=3,
        local_epoch=2,
        batch_size=64,
        alpha=0.5,
        learning_rate=0.001,
        th_coeff=0.002,
        seed=1,
        model='lenet5',
        train_examples=900,
        test_examples=300,
    ),
    # A high learning rate and penalty, so that thresholds move within three rounds and the
    # outside-unit estimator, the clip and the importance update all act.
    'cifar10': dict(
        num_clients=4,
        schedulingsize=2,
        comm_rounds=3,
        local_epoch=1,
        batch_size=16,
        alpha=0.5,
        learning_rate=0.05,
        th_coeff=0.02,
        clip=3,
        seed=1,
        model='conv4',
        train_examples=192,
        test_examples=64,
    ),
}


# ------------------------------------------------------------------------------------------------
# Stand-in modules.


def read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(directory: str):
    """(train images, train labels, test images, test labels) as uint8 / int64 arrays."""

    def one(name):
        for suffix in ('.gz', ''):
            path = os.path.join(directory, name + suffix)
            if os.path.exists(path):
                return read_idx(path)
        raise SystemExit(
            f'error: {name} not found in {directory}; '
            'apt-get install -y dataset-fashion-mnist or pass --data.'
        )

    return (
        one('train-images-idx3-ubyte'),
        one('train-labels-idx1-ubyte').astype(np.int64),
        one('t10k-images-idx3-ubyte'),
        one('t10k-labels-idx1-ubyte').astype(np.int64),
    )


class _NoOp:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, x):
        return x


def install_stand_ins(arrays: dict) -> None:
    """torchvision (datasets from `arrays[(name, train)]`, transforms as no-ops), wandb, matplotlib.

    The official loaders ignore their transforms (they wrap the raw tensors in their own datasets),
    so no-op transforms change nothing they compute.
    """
    import torch  # pylint: disable=import-outside-toplevel

    def dataset_class(name):
        class Dataset:
            def __init__(self, root=None, train=True, transform=None, download=False):
                del root, transform, download
                images, labels = arrays[(name, bool(train))]
                self.data = torch.from_numpy(np.array(images))
                self.targets = torch.from_numpy(np.asarray(labels, np.int64))

            def __len__(self):
                return len(self.targets)

        Dataset.__name__ = name
        return Dataset

    tv = types.ModuleType('torchvision')
    datasets = types.ModuleType('torchvision.datasets')
    transforms = types.ModuleType('torchvision.transforms')
    for name in ('FashionMNIST', 'CIFAR10', 'CIFAR100'):
        setattr(datasets, name, dataset_class(name))
    for name in ('ToTensor', 'Compose', 'Normalize', 'Pad', 'RandomCrop', 'RandomHorizontalFlip'):
        setattr(transforms, name, _NoOp)
    tv.datasets, tv.transforms = datasets, transforms
    wandb = types.ModuleType('wandb')
    wandb.init = lambda *a, **k: None
    wandb.log = lambda *a, **k: None
    mpl = types.ModuleType('matplotlib')
    mpl.pyplot, mpl.colors = (
        _module_of_noops('matplotlib.pyplot'),
        _module_of_noops('matplotlib.colors'),
    )
    sys.modules.update(
        {
            'torchvision': tv,
            'torchvision.datasets': datasets,
            'torchvision.transforms': transforms,
            'wandb': wandb,
            'matplotlib': mpl,
            'matplotlib.pyplot': mpl.pyplot,
            'matplotlib.colors': mpl.colors,
        }
    )


def _module_of_noops(name: str) -> types.ModuleType:
    """A module whose every public attribute is a function that does nothing."""
    module = types.ModuleType(name)

    def getattr_(attr):
        if attr.startswith('__'):
            raise AttributeError(attr)
        return lambda *a, **k: None

    module.__getattr__ = getattr_
    return module


def official_folder(official: str, folder: str) -> str:
    """The folder `main/<folder>` of a checkout, or of a bare mirror's HEAD (extracted)."""
    path = os.path.join(official, 'main', folder)
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.exists(os.path.join(official, 'HEAD')):
        out = tempfile.mkdtemp(prefix='spafl_official_')
        archive = subprocess.run(
            ['git', '-C', official, 'archive', 'HEAD', 'main'], check=True, capture_output=True
        ).stdout
        subprocess.run(['tar', '-x', '-C', out], input=archive, check=True)
        return os.path.join(out, 'main', folder)
    raise SystemExit(
        f'error: --official={official} holds no main/{folder}: pass a checkout (or '
        'a git mirror) of news-vt/SpaFL_NeruIPS_2024.'
    )


def import_folder(path: str) -> None:
    """Makes the folder's own modules importable the way its train.py expects (cwd and sys.path).

    The CIFAR folders' model/net.py imports `binarization` as a top-level module while the clients
    import `model.binarization`; both names are made to refer to one module, or the clients'
    isinstance checks would not recognise the model's masked layers.
    """
    os.chdir(path)
    sys.path.insert(0, path)
    sys.path.append(os.path.join(path, 'model'))
    sys.modules['model.binarization'] = importlib.import_module('binarization')


# ------------------------------------------------------------------------------------------------
# Curves: the unchanged train.py of the FMNIST folder on the real data.

LOG_LINE = re.compile(r'round: (\d+), avg_acc: ([0-9.]+), avg_density: ([0-9.]+)')


def log_to_metrics(log_path: str) -> list[dict]:
    """The official log's per-round lines as our metrics records (round from 1, fractions)."""
    records = []
    with open(log_path) as f:
        for line in f:
            m = LOG_LINE.search(line)
            if m:
                records.append(
                    {
                        'round': int(m.group(1)) + 1,
                        'accuracy': float(m.group(2)) / 100.0,
                        'density': float(m.group(3)),
                    }
                )
    return records


def write_curve_record(log_path: str, out: str, config: dict) -> None:
    os.makedirs(out, exist_ok=True)
    if os.path.abspath(log_path) != os.path.abspath(os.path.join(out, 'train_log.txt')):
        shutil.copyfile(log_path, os.path.join(out, 'train_log.txt'))
    with open(os.path.join(out, 'metrics.jsonl'), 'w') as f:
        for record in log_to_metrics(log_path):
            f.write(json.dumps(record) + '\n')
    with open(os.path.join(out, 'config.json'), 'w') as f:
        json.dump(config, f, indent=1)


def run_curve(args) -> None:
    if args.checkpoint and args.draws:
        raise SystemExit('error: --draws records one uninterrupted run; drop it or --checkpoint.')
    if args.checkpoint_every < 1:
        raise SystemExit(f'error: --checkpoint_every={args.checkpoint_every}; pass 1 or more.')
    data = load_fashion_mnist(args.data)
    install_stand_ins({('FashionMNIST', True): data[:2], ('FashionMNIST', False): data[2:]})
    folder = official_folder(args.official, 'fmnist')
    out = os.path.abspath(args.out)
    checkpoint = os.path.abspath(args.checkpoint) if args.checkpoint else None
    import_folder(folder)
    argv = [
        'train.py',
        '--learning_rate',
        '0.001',
        '--th_coeff',
        '0.002',
        '--local_epoch',
        '5',
        '--seed',
        str(args.seed),
        '--comm_rounds',
        str(args.rounds),
        '--affix',
        'curve',
    ]
    config = {
        'code': 'official FMNIST folder (news-vt/SpaFL_NeruIPS_2024), unchanged'
        + (', its model cast to float64' if args.float64 else ''),
        'command': ' '.join(argv),
        'data': args.data,
        'dtype': 'float64' if args.float64 else 'float32',
    }
    sys.argv = argv
    if args.float64:
        _run_in_float64()
    draws = _record_draws(data) if args.draws else None
    resumable = None
    if checkpoint:
        identity = {k: v for k, v in config.items() if k != 'command'} | {'seed': args.seed}
        resumable = _Resumable(checkpoint, args.checkpoint_every, identity)
    import runpy  # pylint: disable=import-outside-toplevel

    log = os.path.join(folder, 'log', 'curve', 'train_log.txt')
    try:
        runpy.run_path(os.path.join(folder, 'train.py'), run_name='__main__')
    finally:
        if resumable and resumable.resumed_at is not None:
            config['resumed_at_rounds'] = resumable.resumed_at
        if os.path.exists(log):
            text = (resumable.log_before if resumable else '') + _read_text(log)
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, 'train_log.txt'), 'w') as f:
                f.write(text)
            write_curve_record(os.path.join(out, 'train_log.txt'), out, config)
        if draws and draws.get('recorder'):
            _write_draws(draws, args)


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


class _Resumable:
    """Makes the official FMNIST loop resumable without changing a line of it.

    Every `every` rounds, before the round draws its clients, and once more after the last round,
    the whole simulation state is saved to `path` (atomically): the server's and every client's
    attributes (models, optimizers, thresholds, counters), the Python, NumPy and PyTorch random
    states, and the official log so far. A start that finds `path` rebuilds what the seed rebuilds
    identically (the split, the loaders, the arguments), puts the saved state back and lets the
    official loop run on from the saved round, so that a run stopped and resumed, or extended to
    more rounds, computes what one uninterrupted run computes. The official log file is
    overwritten at every start (its logger opens it with mode 'w'); the log before the resumed round
    comes from the checkpoint.
    """

    # Attributes that every start rebuilds identically from the seed and the arguments.
    REBUILT = ('args', 'logger', 'loss', 'tr_loader', 'te_loader', 'device', 'scheduler')

    def __init__(self, path: str, every: int, identity: dict):
        self.path, self.every, self.identity = path, every, identity
        self.resumed_at: list[int] | None = None
        self.log_before = ''
        self.module = importlib.import_module('Simulator')
        loop = self.module.Simulator.FL_loop

        def fl_loop(simulator):
            start = self.restore(simulator)
            self.wrap_sampling(simulator, start)
            numpy = self.module.np
            self.module.np = _NumpyLoopFrom(start, simulator.args.comm_rounds)
            try:
                loop(simulator)
            finally:
                self.module.np = numpy
            self.save(simulator, simulator.args.comm_rounds)

        self.module.Simulator.FL_loop = fl_loop

    def restore(self, simulator) -> int:
        """Puts a saved state back into `simulator`; the round to go on from (0: none saved)."""
        import torch  # pylint: disable=import-outside-toplevel

        if not os.path.exists(self.path):
            return 0
        saved = torch.load(self.path, weights_only=False)
        if saved['identity'] != self.identity:
            raise SystemExit(
                f'error: --checkpoint={self.path} holds another run ({saved["identity"]}); '
                'pass another --checkpoint, or delete it to start afresh.'
            )
        start = saved['round']
        if start > simulator.args.comm_rounds:
            raise SystemExit(
                f'error: --checkpoint={self.path} is at round {start}, past --rounds='
                f'{simulator.args.comm_rounds}; pass --rounds={start} or more.'
            )
        vars(simulator.Server).update(saved['server'])
        for client, attributes in zip(simulator.Clients_list, saved['clients']):
            vars(client).update(_without_history(attributes))
            for module in client.model.modules():
                vars(module).update(_without_history(vars(module)))
            # One entry per round of the run that made it; a longer run needs more.
            missing = simulator.args.comm_rounds - len(client.zero_list)
            client.zero_list = list(client.zero_list) + [0] * max(missing, 0)
        random.setstate(saved['random']['python'])
        np.random.set_state(saved['random']['numpy'])
        torch.set_rng_state(saved['random']['torch'])
        self.log_before = saved['log']
        self.resumed_at = saved['resumed_at'] + [start]
        print(f'resuming the official run at round {start} from {self.path}', flush=True)
        return start

    def wrap_sampling(self, simulator, start: int) -> None:
        server, sample = simulator.Server, simulator.Server.sample_clients
        rounds_done = [start]

        def sample_clients():
            if rounds_done[0] != start and rounds_done[0] % self.every == 0:
                self.save(simulator, rounds_done[0])
            rounds_done[0] += 1
            return sample()

        server.sample_clients = sample_clients

    def save(self, simulator, rounds_done: int) -> None:
        import torch  # pylint: disable=import-outside-toplevel

        def attributes(obj):
            return {
                k: v
                for k, v in vars(obj).items()
                if k not in self.REBUILT and not isinstance(v, types.FunctionType)
            }

        log = os.path.join('log', 'curve', 'train_log.txt')  # the official folder is the cwd
        state = {
            'identity': self.identity,
            'round': rounds_done,
            'resumed_at': self.resumed_at or [],
            'server': attributes(simulator.Server),
            'clients': [attributes(c) for c in simulator.Clients_list],
            'random': {
                'python': random.getstate(),
                'numpy': np.random.get_state(),
                'torch': torch.get_rng_state(),
            },
            'log': self.log_before + (_read_text(log) if os.path.exists(log) else ''),
        }
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        torch.save(state, self.path + '.tmp')
        os.replace(self.path + '.tmp', self.path)


def _without_history(attributes: dict) -> dict:
    """`attributes` with every tensor that is not a parameter detached.

    The official code keeps tensors with autograd history as plain attributes (a client's
    `FLOPs`, a layer's kept `ratio`, both computed from the thresholds); saved and loaded, they come
    back as leaves that require grad, on which the official `self.FLOPs += ...` fails. Detached,
    they hold the same values and nothing differentiates them.
    """
    import torch  # pylint: disable=import-outside-toplevel

    return {
        k: v.detach()
        if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter)
        else v
        for k, v in attributes.items()
    }


class _NumpyLoopFrom:
    """NumPy, but for the official loop's `np.arange(comm_rounds)`, which starts at `start`."""

    def __init__(self, start: int, rounds: int):
        self._start, self._rounds = start, rounds

    def __getattr__(self, name):
        return getattr(np, name)

    def arange(self, *args, **kwargs):
        if args == (self._rounds,) and not kwargs:
            return np.arange(self._start, self._rounds)
        return np.arange(*args, **kwargs)


def _in_float64(model) -> None:
    """`model` cast to float64, and its inputs with it: the official computation unchanged, only
    rounded 2^29 times more finely (as the golden traces run).

    One official detail would keep float32 inside: the step function returns its mask as
    `.float()`, and autograd then rounds the gradient that reaches every threshold (and, through
    the row magnitude, every weight) to float32. Its mask is made in its input's dtype instead:
    0 and 1 either way, the same forward pass, and gradients in float64.
    """
    model.double()
    model_cls = type(model)
    if not getattr(model_cls, '_float64', False):
        forward = model_cls.forward
        model_cls.forward = lambda self, x: forward(self, x.double())
        model_cls._float64 = True  # pylint: disable=protected-access
    step = importlib.import_module('model.binarization').BinaryStep
    if not getattr(step, '_float64', False):

        def mask_in_input_dtype(ctx, x):
            ctx.save_for_backward(x)
            return (x > 0.0).to(x.dtype)

        step.forward = staticmethod(mask_in_input_dtype)
        step._float64 = True  # pylint: disable=protected-access


def _run_in_float64() -> None:
    """The FMNIST folder's model made float64 as the simulator receives it. Nothing else changes
    and no random number is drawn, so its draws are those of the float32 run of the same seed."""
    simulator_cls = importlib.import_module('Simulator').Simulator
    initialization = simulator_cls.initialization

    def initialize(self, model):
        _in_float64(model)
        initialization(self, model)

    simulator_cls.initialization = initialize


def _record_draws(data) -> dict:
    """Hooks the FMNIST folder's split and simulator so that its draws are recorded as it runs.

    Nothing the official code computes changes (no random numbers are drawn by the hooks): its
    split is kept as indices into the IDX files, its initial model whole, and each round's sampled
    clients, every batch order and every client's test accuracy and density, so that
    `research/official/replay_curve.py` can run our library on exactly the same draws.
    """
    draws: dict = {}
    split_module = importlib.import_module('Split_Data')
    split = split_module.Non_iid_split

    def non_iid_split(*a, **k):
        tr_sets, te_sets = split(*a, **k)
        draws['train_ids'] = [_positions_in(d.x_data, data[0]) for d in tr_sets]
        draws['test_ids'] = [_positions_in(d.x_data, data[2]) for d in te_sets]
        return tr_sets, te_sets

    split_module.Non_iid_split = non_iid_split

    simulator_cls = importlib.import_module('Simulator').Simulator
    initialization = simulator_cls.initialization

    def initialize(self, model):
        initialization(self, model)
        layers = _masked_layers(self.Server.initial_model)
        draws['layers'] = [name for name, _ in layers]
        # Float32 values even in a float64 run (drawn in float32, then cast exactly).
        draws['initial'] = {name: _np(layer.weight).astype(np.float32) for name, layer in layers}
        draws['settings'] = {
            k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str))
        }
        draws['recorder'] = _Recorder(self, draws['train_ids'], self.args, snapshots=False)

    simulator_cls.initialization = initialize
    return draws


def _write_draws(draws: dict, args) -> None:
    recorder = draws['recorder']
    meta = {
        'folder': 'fmnist',
        'settings': draws['settings'],
        'layers': draws['layers'],
        'layer_shapes': [list(w.shape) for w in draws['initial'].values()],
        'rounds_recorded': recorder.round + 1,
        'data': args.data,
        'dtype': 'float64' if args.float64 else 'float32',
        'drop_last': False,
    }
    out = {'meta': np.array(json.dumps(meta))}
    for name, w in draws['initial'].items():
        out[f'initial/{name}/weight'] = w
        out[f'initial/{name}/row_sum'] = w.reshape(w.shape[0], -1).astype(np.float64).sum(axis=1)
    for k, (tr, te) in enumerate(zip(draws['train_ids'], draws['test_ids'])):
        out[f'split/train/{k}'], out[f'split/test/{k}'] = tr, te
    out.update(
        {k: (v.astype(np.int32) if '/order/' in k else v) for k, v in recorder.arrays.items()}
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.draws)), exist_ok=True)
    np.savez_compressed(args.draws, **out)
    print(
        f'wrote {args.draws}: rounds {meta["rounds_recorded"]}, '
        f'{os.path.getsize(args.draws) / 1e6:.1f} MB'
    )


# ------------------------------------------------------------------------------------------------
# Golden traces.


def initial_weights(shapes: list[tuple[int, ...]], seed: int) -> list[np.ndarray]:
    """The trace's initial masked-layer weights: PyTorch's default init distribution (uniform in
    +-1/sqrt(fan_in)) drawn with NumPy, so that the test can draw them again without PyTorch."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        fan_in = int(np.prod(shape[1:]))
        bound = 1.0 / np.sqrt(fan_in)
        out.append(rng.uniform(-bound, bound, shape).astype(np.float32))
    return out


def synthetic_cifar(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-shaped 0-255 images [n, 3, 32, 32] (channels first, so that the official loader's
    reshape is the identity) with class-dependent colours, as float32, and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int64)
    colours = rng.uniform(60.0, 196.0, (10, 3, 1, 1))
    images = np.clip(rng.normal(0.0, 40.0, (n, 3, 32, 32)) + colours[labels], 0, 255)
    return np.round(images).astype(np.uint8).astype(np.float32), labels


def _masked_layers(model):
    from model import binarization  # pylint: disable=import-outside-toplevel

    return [
        (name, layer)
        for name, layer in model.named_modules()
        if isinstance(layer, (binarization.MaskedConv2d, binarization.MaskedMLP))
    ]


DIGEST_ENTRIES = 16


def digest(model, seed: int = 0) -> dict[str, np.ndarray]:
    """A small, exact fingerprint of a model's masked weights: per row (output feature) the sum and
    the mean magnitude, and a fixed sample of entries of every layer."""
    out = {}
    for name, layer in _masked_layers(model):
        w = layer.weight.detach().numpy().reshape(layer.weight.shape[0], -1).astype(np.float64)
        picks = np.random.default_rng(seed).choice(w.size, DIGEST_ENTRIES, replace=False)
        out[f'{name}/row_sum'] = w.sum(axis=1)
        out[f'{name}/row_abs_mean'] = np.abs(w).mean(axis=1)
        out[f'{name}/entries'] = w.reshape(-1)[np.sort(picks)]
        out[f'{name}/entry_index'] = np.sort(picks)
    return out


def record_trace(args) -> None:
    import torch  # pylint: disable=import-outside-toplevel
    from torch.utils.data import DataLoader  # pylint: disable=import-outside-toplevel

    settings = dict(TRACES[args.folder])
    if args.th_coeff is not None:  # a larger penalty makes layers collapse within the trace
        settings['th_coeff'] = args.th_coeff
    recorded_settings = dict(settings)
    n_train, n_test = settings.pop('train_examples'), settings.pop('test_examples')
    if args.folder == 'fmnist':
        images, labels, test_images, test_labels = load_fashion_mnist(args.data)
        train = (images[:n_train], labels[:n_train])
        test = (test_images[:n_test], test_labels[:n_test])
        arrays = {('FashionMNIST', True): train, ('FashionMNIST', False): test}
    else:
        train = synthetic_cifar(n_train, 10)
        test = synthetic_cifar(n_test, 11)
        arrays = {('CIFAR10', True): train, ('CIFAR10', False): test}
    install_stand_ins(arrays)
    out = os.path.abspath(args.out)
    import_folder(official_folder(args.official, args.folder))

    import train_argument  # pylint: disable=import-outside-toplevel,import-error

    sys.argv = ['train.py'] + [f'--{k}={v}' for k, v in settings.items()]
    official_args = train_argument.parser()
    for name in ('log_folder', 'model_folder'):
        setattr(official_args, name, tempfile.mkdtemp())
    seed = official_args.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    # The folder's own split and loaders, as its train.py builds them.
    split_module = importlib.import_module('Split_Data')
    dataset_cls = (
        sys.modules['torchvision'].datasets.FashionMNIST
        if args.folder == 'fmnist'
        else sys.modules['torchvision'].datasets.CIFAR10
    )
    tr_dataset, te_dataset = dataset_cls(train=True), dataset_cls(train=False)
    if args.folder == 'fmnist':
        tr_sets, te_sets = split_module.Non_iid_split(
            10, official_args.num_clients, tr_dataset, te_dataset, official_args.alpha
        )
        drop_last = False
    else:
        tr_sets, te_sets = split_module.Non_iid_split_cifar(
            10, official_args.num_clients, tr_dataset, te_dataset, official_args.alpha
        )
        counts = [len(d) for d in tr_sets]
        if min(counts) < official_args.batch_size:
            raise SystemExit(
                f'error: the split gave a client {min(counts)} examples; change the '
                'trace seed or alpha.'
            )
        drop_last = True
    train_ids = [_positions_in(d.x_data, train[0]) for d in tr_sets]
    test_ids = [_positions_in(d.x_data, test[0]) for d in te_sets]
    tr_loaders = [
        DataLoader(
            d, num_workers=0, batch_size=official_args.batch_size, shuffle=True, drop_last=drop_last
        )
        for d in tr_sets
    ]
    te_loaders = [
        DataLoader(d, num_workers=0, batch_size=official_args.batch_size, shuffle=True)
        for d in te_sets
    ]

    if args.folder == 'fmnist':
        model = importlib.import_module('model.lenet').LeNet_5_Masked()
    else:
        model = importlib.import_module('model.net').masked_Conv4()
    # In float64: the official computation unchanged, but precise enough that an activation within
    # float32 rounding of a ReLU kink cannot send the two codes apart (with raw 0-255 pixels that
    # happens within a few float32 steps, and the trajectories then drift by 1e-4).
    _in_float64(model)
    layers = _masked_layers(model)
    init_seed = 1000 + seed
    with torch.no_grad():
        for (_, layer), w in zip(
            layers, initial_weights([tuple(l.weight.shape) for _, l in layers], init_seed)
        ):
            layer.weight.copy_(torch.from_numpy(w.astype(np.float64)))

    logger = _quiet_logger()
    simulator = importlib.import_module('Simulator').Simulator(
        official_args, logger, tr_loaders, te_loaders, torch.device('cpu')
    )
    simulator.initialization(copy.deepcopy(model))
    record = _Recorder(simulator, train_ids, official_args)
    simulator.FL_loop()

    meta = {
        'folder': args.folder,
        'settings': recorded_settings,
        'init_seed': init_seed,
        'layers': [name for name, _ in layers],
        'layer_shapes': [list(l.weight.shape) for _, l in layers],
        'drop_last': drop_last,
        'torch': torch.__version__,
        'dtype': 'float64',
        'collapse_resets': [
            int(l.zero_count) for c in simulator.Clients_list for _, l in _masked_layers(c.model)
        ],
    }
    # Every image holds 0-255 integers (real Fashion-MNIST, or synthetic CIFAR): stored as uint8.
    arrays_out = {
        'meta': np.array(json.dumps(meta)),
        'train_images': train[0].astype(np.uint8),
        'train_labels': train[1],
        'test_images': test[0].astype(np.uint8),
        'test_labels': test[1],
    }
    arrays_out.update({f'initial/{k}': v for k, v in digest(model).items()})
    for k, ids in enumerate(train_ids):
        arrays_out[f'split/train/{k}'] = ids
    for k, ids in enumerate(test_ids):
        arrays_out[f'split/test/{k}'] = ids
    arrays_out.update(record.arrays)
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    np.savez_compressed(out, **arrays_out)
    print(
        f'wrote {out}: {len(arrays_out)} arrays, {os.path.getsize(out) / 1e6:.2f} MB; '
        f'collapse resets {sum(meta["collapse_resets"])}'
    )


def _quiet_logger():
    import logging  # pylint: disable=import-outside-toplevel

    logger = logging.getLogger('official')
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


def _positions_in(subset, images: np.ndarray) -> np.ndarray:
    """Indices into `images` of the rows of a client's dataset, in the dataset's order.

    The official split keeps no indices, only copies of the examples; identical images are
    interchangeable (a duplicate's label is checked by the test through the recorded labels)."""
    flat = np.asarray(subset.reshape(subset.shape[0], -1).numpy(), dtype=images.dtype)
    where: dict[bytes, list[int]] = {}
    for i, row in enumerate(images.reshape(images.shape[0], -1)):
        where.setdefault(row.tobytes(), []).append(i)
    used: dict[bytes, int] = {}
    out = []
    for row in flat:
        key = row.tobytes()
        k = used.get(key, 0)
        out.append(where[key][k % len(where[key])])
        used[key] = k + 1
    return np.asarray(out, np.int64)


class _Recorder:
    """Wraps the official server, clients and datasets of one simulation and records each round."""

    def __init__(self, simulator, train_ids, official_args, snapshots=True):
        self.simulator, self.args = simulator, official_args
        self.snapshots = snapshots
        self.arrays: dict[str, np.ndarray] = {}
        self.round = -1
        self.train_ids = train_ids
        server = simulator.Server
        sample = server.sample_clients

        def sample_clients():
            self.round += 1
            sampled = sample()
            self.arrays[f'r{self.round}/sampled'] = np.asarray(sampled, np.int64)
            return sampled

        server.sample_clients = sample_clients

        aggregate = server.aggregation

        def aggregation(clients_list, sampling_set):
            aggregate(clients_list, sampling_set)
            for name, value in server.global_thresholds.items():
                self.arrays[f'r{self.round}/global/{name}'] = _np(value)
            for name, value in server.global_difference.items():
                self.arrays[f'r{self.round}/delta/{name}'] = _np(value)

        server.aggregation = aggregation

        for k, client in enumerate(simulator.Clients_list):
            self._wrap_client(k, client)

    def _wrap_client(self, k, client):
        train, test, th_update = client.local_training, client.local_test, client.th_update
        dataset = client.tr_loader.dataset
        ids = self.train_ids[k]

        def local_training(comm_rounds):
            seen = []
            get = type(dataset).__getitem__
            dataset.__class__ = type(
                'Logged',
                (type(dataset),),
                {'__getitem__': lambda self_, i: (seen.append(int(i)), get(self_, i))[1]},
            )
            try:
                train(comm_rounds)
            finally:
                dataset.__class__ = type(dataset).__mro__[1]
            self.arrays[f'r{self.round}/order/{k}'] = ids[np.asarray(seen, np.int64)]
            self._snapshot(f'r{self.round}/trained/{k}', client)

        def local_test():
            acc, loss, density = test()
            prefix = f'r{self.round}/tested/{k}'
            self.arrays[f'{prefix}/accuracy'] = np.float64(acc)
            self.arrays[f'{prefix}/density'] = np.float64(density)
            layers = [layer for _, layer in _masked_layers(client.model)]
            # Per masked layer: the kept fraction this test's masks had, and how many times the
            # layer has collapsed and had its thresholds reset so far (the official `zero_count`).
            self.arrays[f'{prefix}/layer_density'] = np.asarray(
                [float(layer.ratio) for layer in layers], np.float64
            )
            self.arrays[f'{prefix}/resets'] = np.asarray(
                [int(layer.zero_count) for layer in layers], np.int32
            )
            self._snapshot(prefix, client)
            return acc, loss, density

        def update(global_difference):
            th_update(global_difference)
            if global_difference:
                self._snapshot(f'r{self.round}/importance/{k}', client)

        client.local_training, client.local_test, client.th_update = (
            local_training,
            local_test,
            update,
        )

    def _snapshot(self, prefix, client):
        if not self.snapshots:
            return
        for name, layer in _masked_layers(client.model):
            self.arrays[f'{prefix}/threshold/{name}'] = _np(layer.threshold)
        for key, value in digest(client.model).items():
            self.arrays[f'{prefix}/{key}'] = value
        for name, module in client.model.named_modules():
            if hasattr(module, 'running_mean') and module.running_mean is not None:
                self.arrays[f'{prefix}/bn/{name}/mean'] = _np(module.running_mean)
                self.arrays[f'{prefix}/bn/{name}/var'] = _np(module.running_var)


def _np(tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    trace = sub.add_parser('trace', help='record a golden trace of a folder on a small subset')
    trace.add_argument('--folder', choices=sorted(TRACES), required=True)
    trace.add_argument(
        '--th_coeff',
        type=float,
        default=None,
        help="override the trace's th_coeff (0.5: layers collapse and reset)",
    )
    curve = sub.add_parser('curve', help='run the unchanged FMNIST folder and keep its curve')
    curve.add_argument('--rounds', type=int, default=200)
    curve.add_argument('--seed', type=int, default=1)
    curve.add_argument(
        '--draws',
        default=None,
        help='also record the draws (split, initial model, sampled clients, batch '
        'orders, per-client results) to this .npz, for replay_curve.py',
    )
    curve.add_argument(
        '--checkpoint',
        default=None,
        help='save the whole simulation here every --checkpoint_every rounds and after the '
        'last, and resume from it when it exists (a run longer than a session; also extends a '
        'finished run to more --rounds); keep it out of research/results/',
    )
    curve.add_argument('--checkpoint_every', type=int, default=5)
    curve.add_argument(
        '--float64',
        action='store_true',
        help='run the official model in float64 (the same draws as float32): '
        'with replay_curve.py --float64, whether the two codes part on the '
        'real workload for a reason other than float32 rounding',
    )
    convert = sub.add_parser('convert', help='turn an official train_log.txt into a curve record')
    convert.add_argument('--log', required=True)
    convert.add_argument('--seed', type=int, default=1)
    for p in (trace, curve):
        p.add_argument(
            '--official',
            required=True,
            help='checkout (or git mirror) of news-vt/SpaFL_NeruIPS_2024',
        )
        p.add_argument('--data', default=FMNIST_DIR, help='Fashion-MNIST IDX files')
    for p in (trace, curve, convert):
        p.add_argument('--out', required=True)
    args = parser.parse_args()
    if args.command == 'trace':
        record_trace(args)
    elif args.command == 'curve':
        run_curve(args)
    else:
        write_curve_record(
            args.log,
            args.out,
            {
                'code': 'official FMNIST folder (news-vt/SpaFL_NeruIPS_2024), unchanged',
                'command': f'train.py --learning_rate 0.001 --th_coeff 0.002 --local_epoch 5 '
                f'--seed {args.seed}',
                'data': FMNIST_DIR,
            },
        )


if __name__ == '__main__':
    main()
