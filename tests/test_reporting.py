"""Tests for spafl_jax.reporting (kill-safe metrics, TensorBoard) and spafl_jax.figures."""

import json
import os

import matplotlib.image
import matplotlib.text
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from spafl_jax import figures
from spafl_jax import reporting

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _lines(path):
    with open(path, 'rb') as f:
        return f.read().split(b'\n')


def _assert_real_png(path):
    with open(path, 'rb') as f:
        assert f.read(8) == _PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    # A blank canvas has zero variance; curves, text and axes do not.
    assert float(np.var(pixels[..., :3])) > 1e-3


def _scalars(tensorboard_dir, tag):
    acc = event_accumulator.EventAccumulator(
        tensorboard_dir, size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_write_round_trips_exactly_and_converts_numpy(tmp_path):
    with reporting.MetricsWriter(str(tmp_path)) as writer:
        writer.write(
            {
                'round': np.int64(0),
                'accuracy': np.float32(0.25),
                'bits_up': np.int64(2**40),
                'note': 'first',
            }
        )
        writer.write(
            {'round': 5, 'accuracy': 0.5, 'density': np.array(0.75), 'converged': np.bool_(False)}
        )
    path = tmp_path / 'metrics.jsonl'
    raw = _lines(path)
    assert raw[-1] == b''  # Every record ends in a newline.
    assert json.loads(raw[0]) == {'round': 0, 'accuracy': 0.25, 'bits_up': 2**40, 'note': 'first'}
    assert list(json.loads(raw[0])) == sorted(json.loads(raw[0]))
    records = reporting.read_metrics(str(path))
    assert records == [
        {'round': 0, 'accuracy': 0.25, 'bits_up': 2**40, 'note': 'first'},
        {'round': 5, 'accuracy': 0.5, 'density': 0.75, 'converged': False},
    ]
    assert type(records[0]['round']) is int
    assert type(records[0]['bits_up']) is int
    assert type(records[1]['density']) is float


def test_write_rejects_non_scalars_and_repeated_rounds(tmp_path):
    with reporting.MetricsWriter(str(tmp_path)) as writer:
        with pytest.raises(TypeError):
            writer.write({'round': 0, 'accuracy': np.zeros(3)})
        writer.write({'round': 3, 'accuracy': 0.1})
        with pytest.raises(ValueError):
            writer.write({'round': 3, 'accuracy': 0.2})
    # A reopened writer remembers the last round on disk.
    with reporting.MetricsWriter(str(tmp_path)) as writer:
        with pytest.raises(ValueError):
            writer.write({'round': 2, 'accuracy': 0.2})
        writer.write({'round': 4, 'accuracy': 0.3})
    rounds = [r['round'] for r in reporting.read_metrics(str(tmp_path / 'metrics.jsonl'))]
    assert rounds == [3, 4]


def test_partial_trailing_line_is_cut_on_open(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_bytes(
        b'{"accuracy": 0.1, "round": 0}\n{"accuracy": 0.2, "round": 1}\n{"accuracy": 0.3, "ro'
    )
    with reporting.MetricsWriter(str(tmp_path)) as writer:
        assert path.read_bytes() == (
            b'{"accuracy": 0.1, "round": 0}\n{"accuracy": 0.2, "round": 1}\n'
        )
        writer.write({'round': 2, 'accuracy': 0.4})
    assert reporting.read_metrics(str(path)) == [
        {'round': 0, 'accuracy': 0.1},
        {'round': 1, 'accuracy': 0.2},
        {'round': 2, 'accuracy': 0.4},
    ]


def test_resume_drops_later_rounds_then_appends_without_duplicates(tmp_path):
    with reporting.MetricsWriter(str(tmp_path)) as writer:
        for r in range(0, 10, 2):  # Rounds 0, 2, 4, 6, 8.
            writer.write({'round': r, 'accuracy': r / 100})
    # The run was checkpointed at round 5 and is restarted from there.
    with reporting.MetricsWriter(str(tmp_path), resume_from_round=5) as writer:
        assert [r['round'] for r in reporting.read_metrics(writer.path)] == [0, 2, 4]
        for r in range(6, 12, 2):  # Rounds 6, 8, 10, recomputed.
            writer.write({'round': r, 'accuracy': r / 50})
    records = reporting.read_metrics(str(tmp_path / 'metrics.jsonl'))
    assert [r['round'] for r in records] == [0, 2, 4, 6, 8, 10]
    assert [r['accuracy'] for r in records] == [0.0, 0.02, 0.04, 0.12, 0.16, 0.2]
    leftovers = [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]
    assert leftovers == []


def test_read_metrics_ignores_partial_line(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_bytes(b'{"round": 0, "accuracy": 0.5}\n{"round": 1, "accu')
    assert reporting.read_metrics(str(path)) == [{'round': 0, 'accuracy': 0.5}]
    path.write_bytes(b'')
    assert reporting.read_metrics(str(path)) == []


def test_tensorboard_scalars_read_back(tmp_path):
    with reporting.MetricsWriter(str(tmp_path)) as writer:
        writer.write({'round': 0, 'accuracy': 0.125, 'density/Conv_0': 1.0, 'note': 'skipped'})
        writer.write({'round': 10, 'accuracy': np.float32(0.5), 'density/Conv_0': 0.25})
    tb_dir = str(tmp_path / 'tensorboard')
    assert _scalars(tb_dir, 'accuracy') == [(0, 0.125), (10, 0.5)]
    assert _scalars(tb_dir, 'density/Conv_0') == [(0, 1.0), (10, 0.25)]
    acc = event_accumulator.EventAccumulator(tb_dir)
    acc.Reload()
    assert sorted(acc.Tags()['scalars']) == ['accuracy', 'density/Conv_0']


def test_tensorboard_purges_rounds_redone_after_resume(tmp_path):
    with reporting.MetricsWriter(str(tmp_path)) as writer:
        for r in (0, 2, 4):
            writer.write({'round': r, 'accuracy': 0.1})
    with reporting.MetricsWriter(str(tmp_path), resume_from_round=2) as writer:
        for r in (2, 4):
            writer.write({'round': r, 'accuracy': 0.9})
    assert _scalars(str(tmp_path / 'tensorboard'), 'accuracy') == [
        (0, pytest.approx(0.1)),
        (2, pytest.approx(0.9)),
        (4, pytest.approx(0.9)),
    ]


def _records(num_rounds=20):
    return [
        {
            'round': r,
            'accuracy': 0.1 + 0.6 * r / num_rounds,
            'accuracy_weighted': 0.12 + 0.58 * r / num_rounds,
            'density': 1.0 - 0.5 * r / num_rounds,
            'density_weighted': 1.0 - 0.55 * r / num_rounds,
            'density/Conv_0': 1.0 - 0.3 * r / num_rounds,
            'density/Dense_0': 1.0 - 0.7 * r / num_rounds,
            'accuracy_std': 0.05,
            'bits_up': 32 * 10 * 5000 * (r + 1),
            'bits_down': 32 * 110 * 5000 * (r + 1),
            'bits_dense_equivalent': 32 * 60000 * 10 * (r + 1),
        }
        for r in range(0, num_rounds + 1, 2)
    ]


def test_plot_metrics_writes_all_three_figures(tmp_path):
    paths = reporting.plot_metrics(_records(), str(tmp_path / 'plots'))
    assert [os.path.basename(p) for p in paths] == [
        'accuracy.png',
        'density.png',
        'communication.png',
    ]
    for path in paths:
        _assert_real_png(path)
        with open(path.replace('.png', '.pdf'), 'rb') as f:
            assert f.read(5) == b'%PDF-'  # every figure also as a vector file

    # Drawing is deterministic, the PDF included: drawing again leaves both files untouched.
    def stamps():
        folder = tmp_path / 'plots'
        return {name: os.stat(folder / name).st_mtime_ns for name in os.listdir(folder)}

    before = stamps()
    reporting.plot_metrics(_records(), str(tmp_path / 'plots'))
    assert stamps() == before and len(before) == 6


def _figure_texts(monkeypatch, draw):
    """The texts (titles, labels, legend entries, annotations) and y-scale of every figure
    `draw()` saves."""
    seen = {}

    def capture(fig, path, **_):
        texts = [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
        seen[os.path.basename(path)] = (texts, fig.axes[0].get_yscale(), fig)
        return path

    monkeypatch.setattr(figures, 'save_figure', capture)  # what plot_metrics calls
    draw()
    return seen


def test_communication_is_in_readable_units_against_fedavg(monkeypatch, tmp_path):
    seen = _figure_texts(monkeypatch, lambda: reporting.plot_metrics(_records(), str(tmp_path)))
    texts, scale, fig = seen['communication.png']
    # Ours ends at 32 * 120 * 5000 * 21 = 403 Mbit; FedAvg at 2 * 32 * 60000 * 10 * 21 = 806 Mbit.
    assert 'bits sent so far (Mbit)' in texts and scale == 'linear'
    assert 'FedAvg on the same model and clients (up + down)' in texts
    assert {'sent, up + down', 'uplink (clients to server)', 'downlink (server to clients)'} <= set(
        texts
    )
    assert '2x less than FedAvg' in texts
    total = fig.axes[0].get_lines()[0].get_ydata()
    assert total[-1] == pytest.approx(32 * 120 * 5000 * 21 / 1e6)

    # Far apart (SpaFL sends a hundredth of FedAvg's bits): a log axis, the unit of ours.
    far = [{**r, 'bits_dense_equivalent': 1000 * r['bits_dense_equivalent']} for r in _records()]
    seen = _figure_texts(monkeypatch, lambda: reporting.plot_metrics(far, str(tmp_path)))
    texts, scale, _ = seen['communication.png']
    assert scale == 'log' and 'bits sent so far (Mbit)' in texts
    assert '2,000x less than FedAvg' in texts


def test_accuracy_has_the_spread_over_clients(monkeypatch, tmp_path):
    seen = _figure_texts(monkeypatch, lambda: reporting.plot_metrics(_records(), str(tmp_path)))
    texts, _, fig = seen['accuracy.png']
    assert '± std over clients' in texts
    band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    first, last = _records()[0]['accuracy'], _records()[-1]['accuracy']
    assert band.min() == pytest.approx(100 * (first - 0.05))
    assert band.max() == pytest.approx(100 * (last + 0.05))


def test_plot_metrics_skips_figures_whose_keys_are_absent(tmp_path):
    records = [{'round': r['round'], 'accuracy': r['accuracy']} for r in _records()]
    paths = reporting.plot_metrics(records, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ['accuracy.png']
    assert sorted(os.listdir(tmp_path)) == ['accuracy.pdf', 'accuracy.png']
    assert reporting.plot_metrics([], str(tmp_path / 'empty')) == []


def test_plot_metrics_density_from_layer_keys_only(tmp_path):
    records = [{'round': r['round'], 'density/Conv_0': r['density/Conv_0']} for r in _records()]
    paths = reporting.plot_metrics(records, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ['density.png']
    _assert_real_png(paths[0])


def test_plot_sparsity_pattern(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    masks = (rng.random((10, 64)) < 0.4).astype(np.int32)
    path = reporting.plot_sparsity_pattern(
        masks, str(tmp_path / 'sub' / 'conv0_round100.png'), layer='Conv_0', round_=100
    )
    assert path == str(tmp_path / 'sub' / 'conv0_round100.png')
    _assert_real_png(path)
    assert os.path.exists(tmp_path / 'sub' / 'conv0_round100.pdf')
    # The round is in the title, so two rounds with the same masks are two different files.
    reporting.plot_sparsity_pattern(masks, str(tmp_path / 'round3.png'), layer='Conv_0', round_=3)
    with open(path, 'rb') as a, open(tmp_path / 'round3.png', 'rb') as b:
        assert a.read() != b.read()
    seen = _figure_texts(
        monkeypatch,
        lambda: reporting.plot_sparsity_pattern(masks, 'x.png', layer='Conv_0', round_=100),
    )
    texts, _, fig = seen['x.png']
    kept = int(masks.sum())
    assert (
        f'Conv_0: kept filters per client after round 100\n{kept} of 640 kept '
        f'({kept / 640:.1%})' in texts
    )
    assert {'kept', 'pruned'} <= set(texts)
    # The whole title fits in the figure (it is not clipped at the edges).
    fig.tight_layout()
    fig.canvas.draw()
    box = fig.axes[0].title.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width
    with pytest.raises(ValueError):
        reporting.plot_sparsity_pattern(np.ones(5), str(tmp_path / 'x.png'))


def test_write_json_atomic_round_trips(tmp_path):
    path = str(tmp_path / 'summary.json')
    obj = {'b': [1, 2.5, None], 'a': {'nested': 'yes'}, 'rounds': 500}
    reporting.write_json_atomic(path, obj)
    with open(path) as f:
        text = f.read()
    assert json.loads(text) == obj
    assert text == json.dumps(obj, indent=2, sort_keys=True) + '\n'
    reporting.write_json_atomic(path, {'replaced': True})
    with open(path) as f:
        assert json.load(f) == {'replaced': True}
    assert os.listdir(tmp_path) == ['summary.json']


def test_pyplot_state_untouched(tmp_path):
    import sys

    reporting.plot_metrics(_records(), str(tmp_path))
    reporting.plot_sparsity_pattern(np.eye(4), str(tmp_path / 'm.png'))
    if 'matplotlib.pyplot' in sys.modules:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []


def test_garbage_and_out_of_order_lines_are_left_out_with_a_warning(tmp_path, caplog):
    path = tmp_path / 'metrics.jsonl'
    path.write_bytes(
        b'{"accuracy": 0.1, "round": 1}\n'
        b'\x00\xffgarbage\n'
        b'{"accuracy": 0.2, "round": 2}\n'
        b'[1, 2]\n'
        b'{"accuracy": 0.9, "round": 1}\n'
        b'{"accuracy": 0.3, "round": 3}\n'
    )
    assert [r['round'] for r in reporting.read_metrics(str(path))] == [1, 2, 3]
    with reporting.MetricsWriter(str(tmp_path)) as writer:
        writer.write({'round': 4, 'accuracy': 0.4})
    assert path.read_bytes() == (
        b'{"accuracy": 0.1, "round": 1}\n'
        b'{"accuracy": 0.2, "round": 2}\n'
        b'{"accuracy": 0.3, "round": 3}\n'
        b'{"accuracy": 0.4, "round": 4}\n'
    )
    warned = ' '.join(r.getMessage() for r in caplog.records)
    assert 'line 2: not a metrics record' in warned
    assert 'line 4: not a metrics record' in warned
    assert 'line 5: round 1 does not follow round 2' in warned


def test_a_last_record_that_lost_only_its_newline_is_kept(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    whole = b'{"accuracy": 0.1, "round": 1}\n{"accuracy": 0.2, "round": 2}'
    path.write_bytes(whole)
    assert [r['round'] for r in reporting.read_metrics(str(path))] == [1, 2]
    with reporting.MetricsWriter(str(tmp_path), resume_from_round=3) as writer:
        writer.write({'round': 3, 'accuracy': 0.3})
    assert path.read_bytes() == whole + b'\n{"accuracy": 0.3, "round": 3}\n'


def test_a_clean_file_is_not_rewritten(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    with reporting.MetricsWriter(str(tmp_path)) as writer:
        writer.write({'round': 1, 'accuracy': 0.1})
    before = os.stat(path)
    with reporting.MetricsWriter(str(tmp_path), resume_from_round=2):
        pass
    after = os.stat(path)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def _event_files(tb_dir):
    return sorted(n for n in os.listdir(tb_dir) if 'tfevents' in n)


def test_tensorboard_is_rebuilt_from_the_metrics_and_never_trusted(tmp_path):
    """A torn event, a garbage file and an older writer's file: the next open leaves one file
    holding exactly the records of metrics.jsonl; a file that already does is not touched."""
    with reporting.MetricsWriter(str(tmp_path)) as writer:
        for r in (1, 2, 3):
            writer.write({'round': r, 'accuracy': r / 10})
    tb_dir = str(tmp_path / 'tensorboard')
    path = os.path.join(tb_dir, reporting.EVENTS_FILENAME)
    whole = open(path, 'rb').read()
    stat = os.stat(path)
    with reporting.MetricsWriter(str(tmp_path)):
        pass
    assert open(path, 'rb').read() == whole
    assert os.stat(path).st_mtime_ns == stat.st_mtime_ns and os.stat(path).st_ino == stat.st_ino

    with open(path, 'ab') as f:  # a torn event a kill left
        f.write(whole[-30:-7])
    with open(os.path.join(tb_dir, 'events.out.tfevents.1.old'), 'wb') as f:
        f.write(b'stale')
    with reporting.MetricsWriter(str(tmp_path)) as writer:
        writer.write({'round': 4, 'accuracy': 0.4})
    assert _event_files(tb_dir) == [reporting.EVENTS_FILENAME]
    assert _scalars(tb_dir, 'accuracy') == [(r, pytest.approx(r / 10)) for r in (1, 2, 3, 4)]

    with open(path, 'r+b') as f:  # a flipped byte inside round 2's event: rebuilt from there
        f.seek(len(whole) // 2)
        byte = f.read(1)
        f.seek(len(whole) // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with reporting.MetricsWriter(str(tmp_path), resume_from_round=4):
        pass
    assert _scalars(tb_dir, 'accuracy') == [(r, pytest.approx(r / 10)) for r in (1, 2, 3)]
    assert [r['round'] for r in reporting.read_metrics(str(tmp_path / 'metrics.jsonl'))] == [
        1,
        2,
        3,
    ]


def test_figures_are_written_only_when_they_change(tmp_path):
    records = _records()
    paths = reporting.plot_metrics(records, str(tmp_path))
    before = {p: os.stat(p).st_mtime_ns for p in paths}
    assert reporting.plot_metrics(records, str(tmp_path)) == paths
    assert {p: os.stat(p).st_mtime_ns for p in paths} == before
    reporting.plot_metrics(records[:-1], str(tmp_path))
    assert all(os.stat(p).st_mtime_ns != before[p] for p in paths)
    assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]


def test_atomic_writes_keep_the_permissions_a_plain_write_would_give(tmp_path):
    from spafl_jax import files  # pylint: disable=import-outside-toplevel

    plain, atomic = tmp_path / 'plain', tmp_path / 'atomic'
    plain.write_text('x')
    assert files.write_atomic(str(atomic), 'x')
    assert atomic.stat().st_mode == plain.stat().st_mode
    os.chmod(atomic, 0o640)
    assert files.write_atomic(str(atomic), 'y') and not files.write_atomic(str(atomic), 'y')
    assert atomic.stat().st_mode & 0o777 == 0o640 and atomic.read_text() == 'y'
