"""What the test files share: the synthetic scenes they read, the `slow` marker of the
end-to-end script runs (test_scripts.py), which CI runs too, and Triton's interpreter where
there is no GPU."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors (test_kernels.py).
# Triton reads the variable when a kernel is defined: it is set before elite_fast.py is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import runs
import synthkitti


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the scripts end to end (CI runs these too)")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    """Two training scans (sequence 00) and one validation scan (08), small (256 columns)."""
    root = tmp_path_factory.mktemp("synth")
    return synthkitti.make_dataset(root, {"00": 2, "08": 1}, columns=256, seed=3, progress=False)


@pytest.fixture()
def synth_copy(synth_root, tmp_path):
    """A private copy of the synthetic scenes (these tests write pseudo-labels into it)."""
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    return root


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Two scans at 512 columns with their SAM-PLG pseudo-labels made from the ideal masks."""
    root = tmp_path_factory.mktemp("plg") / "synth"
    synthkitti.make_dataset(root, {"00": 2}, columns=512, progress=False)
    counts = runs.generate_pseudo_labels(root, ["00"], synthkitti.IdealMaskSource(), progress=False)
    assert counts == {"written": 2, "existing": 0, "unlabelled": 0}
    return root



@pytest.fixture(scope="session")
def synth_nusc(tmp_path_factory):
    """Synthetic nuScenes-lidarseg: scene-0001 (training, 3 keyframes) and scene-0003 (val, 2)."""
    import synthnusc
    root = tmp_path_factory.mktemp("synthnusc")
    return synthnusc.make_dataset(root, {"scene-0001": 3, "scene-0003": 2}, columns=512, progress=False)
