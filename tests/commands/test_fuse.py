"""``dicomnode fuse`` on two files and on a folder of pairs."""

import shutil

import numpy as np
from PIL import Image

from dicomnode.cli import main
from dicomnode.fusion.images import load_image


def _copy_pair(aanlib_dir, task, pair_id, dest):
    for path in (aanlib_dir / task).glob(f"{pair_id}_*.png"):
        shutil.copy(path, dest / path.name)


def test_fuse_two_files_keeps_colour_of_functional_image(aanlib_dir, tmp_path):
    out = tmp_path / "fused.png"
    pet, mri = aanlib_dir / "PET-MRI" / "30037_PET.png", aanlib_dir / "PET-MRI" / "30037_MRI.png"
    assert main(["fuse", str(pet), str(mri), str(out), "--method", "gff"]) == 0
    fused = load_image(out)
    assert fused.rgb is not None and fused.rgb.shape == (3, 256, 256)
    # Argument order does not matter: the colour image is the moving one.
    out2 = tmp_path / "fused2.png"
    assert main(["fuse", str(mri), str(pet), str(out2), "--method", "gff"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(out2)))


def test_fuse_default_method_keeps_the_fixed_luminance(aanlib_dir, tmp_path):
    out = tmp_path / "default.png"
    ct, mri = aanlib_dir / "CT-MRI" / "28012_CT.png", aanlib_dir / "CT-MRI" / "28012_MRI.png"
    assert main(["fuse", str(ct), str(mri), str(out), "--device", "cpu"]) == 0
    fused = load_image(out)
    # Colour on luminance: one input is the brightness (the fixed one, lifted 5 %), the other the colour.
    assert fused.rgb is not None and fused.grey.shape == (256, 256)
    luma = 0.299 * fused.rgb[0] + 0.587 * fused.rgb[1] + 0.114 * fused.rgb[2]
    assert min(float(np.abs(luma - load_image(p).grey).mean()) for p in (ct, mri)) < 0.06


def test_fuse_pairs_folder_and_unfusable_pair_is_an_error(aanlib_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    _copy_pair(aanlib_dir, "CT-MRI", "28012", pairs)
    _copy_pair(aanlib_dir, "SPECT-MRI", "4012", pairs)
    # A grey image stored as RGB with equal channels is grey.
    grey = np.asarray(Image.open(aanlib_dir / "CT-MRI" / "33013_CT.png"))
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(pairs / "33013_CT.png")
    shutil.copy(aanlib_dir / "CT-MRI" / "33013_MRI.png", pairs / "33013_T1.png")
    out = tmp_path / "out"
    assert main(["fuse", "--pairs", str(pairs), "--out", str(out), "--method", "average"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["28012.png", "33013.png", "4012.png"]
    assert load_image(out / "33013.png").rgb is None
    assert load_image(out / "4012.png").rgb is not None
    # A partner missing, and a pair of different sizes: both named, exit status 1, others still written.
    shutil.copy(aanlib_dir / "CT-MRI" / "33013_CT.png", pairs / "777_CT.png")
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(pairs / "888_CT.png")
    shutil.copy(aanlib_dir / "CT-MRI" / "33013_MRI.png", pairs / "888_MR.png")
    out2 = tmp_path / "out2"
    capsys.readouterr()
    assert main(["fuse", "--pairs", str(pairs), "--out", str(out2), "--method", "average"]) == 1
    err = capsys.readouterr().err
    assert "777" in err and "888" in err
    assert (out2 / "28012.png").is_file() and not (out2 / "888.png").exists()


def test_fuse_usage_errors(tmp_path):
    assert main(["fuse", str(tmp_path / "a.png")]) == 2
    assert main(["fuse", "--pairs", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert main(["fuse", "--pairs", str(tmp_path), "--out", str(tmp_path / "o"), "--method", "nope"]) == 2
