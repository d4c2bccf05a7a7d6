"""examples/quickstart.ipynb runs from top to bottom and shows what it says it shows."""

import os

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'examples', 'quickstart.ipynb')

pytestmark = pytest.mark.slow  # a kernel in a subprocess


def test_quickstart_notebook_runs(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get('outputs') for cell in notebook.cells if cell.cell_type == 'code'), (
        'commit the notebook without outputs'
    )
    nbclient.NotebookClient(
        notebook,
        timeout=120,
        kernel_name='python3',
        resources={'metadata': {'path': str(tmp_path)}},
    ).execute()
    texts = [
        output.get('text', '')
        for cell in notebook.cells
        if cell.cell_type == 'code'
        for output in cell.outputs
    ]
    text = ''.join(texts)
    assert 'mask: [1. 0.]' in text  # the hand-computed mask
    assert 'mean |w| per output: [2.  0.5]' in text
    assert 'round 10: accuracy' in text and 'conv1: kept rows per client' in text
    assert 'a client sends 3904 bits a round' in text  # 122 thresholds, 32 bits each
    images = [
        output for output in notebook.cells[-1].outputs if 'image/png' in output.get('data', {})
    ]
    assert len(images) == 1  # the plot
