"""`dicomnode register` on files without DICOM headers: modality hints, and what each stage did."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from dicomnode.testing.deform import make_case, phantom_sources, score

# Small and quick; the deformable stage may run on these ~3.5 mm voxels.
CONFIG = """
[registration]
mode = "always"
samples_per_level = 6000
deformable_samples_per_level = 5000
heldout_samples = 10000
deformable_iterations = 6
deformable_max_level_mm = 10.0
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A CT-like moving (HU values) onto an MR-like fixed, as NIfTI and MHA files (no modality in them)."""
    case = make_case(phantom_sources(spacing_mm=2.5, seed=0), "CT", fixed_size=(48, 56, 40), seed=5)
    folder = tmp_path_factory.mktemp("register_cli")
    fixed, moving, config = folder / "fixed.nii.gz", folder / "moving.mha", folder / "node.toml"
    sitk.WriteImage(case.fixed.image, str(fixed))
    sitk.WriteImage(case.moving.image, str(moving))
    config.write_text(CONFIG)
    return case, fixed, moving, config


def _register(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicomnode", "register", *args], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))


def test_unknown_modality_gating_the_deformable_stage_is_said_on_stderr(files, tmp_path):
    case, fixed, moving, config = files
    out = tmp_path / "t.h5"
    run = _register(str(fixed), str(moving), "--out", str(out), "--config", str(config))
    assert run.returncode == 0, run.stderr
    assert "modalities: fixed unknown (no modality in the file and values not CT-like), moving CT (guessed" \
        in run.stdout
    deformable = next(line for line in run.stdout.splitlines() if line.startswith("deformable"))
    assert "not run: CT onto unknown is not a pair of registration.deformable_modalities" in deformable
    rigid = next(line for line in run.stdout.splitlines() if line.startswith("rigid"))
    assert "ran at" in rigid
    assert "the deformable stage did not run because the fixed modality is unknown" in run.stderr
    assert "--fixed-modality CT|MR|PT|NM" in run.stderr and "--moving-modality" not in run.stderr
    assert score(case, sitk.ReadTransform(str(out))).mean_mm < score(case, sitk.Transform(3, sitk.sitkIdentity)).mean_mm


def test_modality_hints_let_the_deformable_stage_run(files, tmp_path):
    case, fixed, moving, config = files
    out = tmp_path / "t.h5"
    run = _register(str(fixed), str(moving), "--out", str(out), "--config", str(config),
                    "--fixed-modality", "MR", "--moving-modality", "CT")
    assert run.returncode == 0, run.stderr
    assert "modalities: fixed MR (--fixed-modality), moving CT (--moving-modality)" in run.stdout
    deformable = next(line for line in run.stdout.splitlines() if line.startswith("deformable"))
    assert "ran at" in deformable and "not run" not in deformable
    assert int(deformable.split()[4]) > 0  # iterations column
    assert "warning" not in run.stderr
    transform = sitk.ReadTransform(str(out))
    assert score(case, transform).mean_mm < score(case, sitk.Transform(3, sitk.sitkIdentity)).mean_mm


def test_modality_hint_must_be_a_dicom_code(files, tmp_path):
    _, fixed, moving, _ = files
    run = _register(str(fixed), str(moving), "--out", str(tmp_path / "t.h5"), "--fixed-modality", "PET")
    assert run.returncode == 2 and "--fixed-modality" in run.stderr and "'PT'" in run.stderr


def test_two_runs_in_separate_processes_agree(files, tmp_path):
    # Same input, same answer: threaded metric sums differ in the last digits between processes, and an
    # optimiser that stops early could turn that into millimetres; two runs must agree within 0.1 mm.
    case, fixed, moving, config = files
    transforms = []
    for k in range(2):
        out = tmp_path / f"t{k}.h5"
        run = _register(str(fixed), str(moving), "--out", str(out), "--config", str(config),
                        "--fixed-modality", "MR")
        assert run.returncode == 0, run.stderr
        transforms.append(sitk.ReadTransform(str(out)))
    a, b = (np.array([t.TransformPoint(tuple(float(v) for v in p)) for p in case.points]) for t in transforms)
    assert float(np.linalg.norm(a - b, axis=1).max()) < 0.1
    first, second = (score(case, t).mean_mm for t in transforms)
    assert abs(first - second) < 0.1 and first < score(case, sitk.Transform(3, sitk.sitkIdentity)).mean_mm
