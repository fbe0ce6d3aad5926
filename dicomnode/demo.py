"""``dicomnode demo``: the whole loop against a local Orthanc PACS, then a preview and the audit summary.

The demo starts a node on the embedded defaults (only the port, the destination and a short
stable age are changed), starts Orthanc on loopback, uploads a CT+PET study to it (the real
STS_002 patient from ``../shared/data`` when present, else a generated phantom), has Orthanc
C-STORE it to the node, waits for the fused series to come back to Orthanc, and writes what
Orthanc holds to ``<workdir>/demo/``, with ``fused_montage.png``: fused slices through the lesion
(the hottest PET voxel) with their colour bar, above the same slices of the explanation maps.
Everything it started is stopped before it returns.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Seconds without a new instance before a series counts as complete (the default is 30 s).
DEMO_STABLE_AGE_S = 3.0
JOB_TIMEOUT_S = 900.0

log = logging.getLogger(__name__)


class DemoError(RuntimeError):
    """The demo could not complete; the message says where it stopped."""


def shared_sts_dir() -> Path:
    """``../shared/data/dicom/sts/STS_002`` beside the checkout (DICOMNODE_SHARED_DATA overrides the data root)."""
    root = Path(os.environ.get("DICOMNODE_SHARED_DATA", REPO.parent / "shared" / "data"))
    return root / "dicom" / "sts" / "STS_002"


def demo_study(workdir: Path, synthetic: bool) -> tuple[str, dict[str, list[Path]]]:
    """(description, {"CT": files, "PT": files}) of the study the demo sends."""
    sts = shared_sts_dir()
    ct, pt = sorted((sts / "CT" / "dicom" / "image").glob("*.dcm")), sorted((sts / "PET" / "dicom" / "image").glob("*.dcm"))
    if not synthetic and ct and pt:
        return f"real CT+PET study STS_002 ({len(ct)} CT + {len(pt)} PET instances)", {"CT": ct, "PT": pt}
    from dicomnode.testing.study import write_synthetic_study

    files = write_synthetic_study(workdir / "input", modalities=("CT", "PT"), seed=0)
    why = "--synthetic" if synthetic else f"no shared data at {sts}"
    return f"synthetic CT+PET phantom ({why}; {len(files['CT'])} CT + {len(files['PT'])} PET instances)", files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def wait_for_job(db, timeout_s: float):
    """The demo's job once it is done or failed (the node creates exactly one for one CT+PET study)."""
    from sqlalchemy import select

    from dicomnode.audit.models import Job, JobState

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        with db.session() as session:
            job = session.scalars(select(Job).order_by(Job.id)).first()
        if job is not None and job.state != last:
            say(f"job {job.id}: {job.state.value}")
            last = job.state
        if job is not None and job.state in (JobState.done, JobState.failed):
            return job
        time.sleep(0.5)
    raise DemoError(f"no finished job within {timeout_s:g} s (last state: {last and last.value})")


def timeline(db, job_id: int, routed_at) -> list[tuple[str, float]]:
    """(milestone, seconds since Orthanc was asked to route the study) from the audit rows."""
    from sqlalchemy import select

    from dicomnode.audit.models import Job, JobEvent, Send, Series
    from dicomnode.store.series import as_utc

    with db.session() as session:
        job = session.get(Job, job_id)
        series = session.scalars(select(Series).where(Series.series_uid.in_([job.fixed_series_uid, job.moving_series_uid]))).all()
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        sends = session.scalars(select(Send).where(Send.job_id == job_id)).all()
        marks = [("first instance received", min(as_utc(s.first_received_at) for s in series)),
                 ("last instance received", max(as_utc(s.last_received_at) for s in series)),
                 ("both series complete", max(as_utc(s.completed_at) for s in series if s.completed_at))]
        marks += [(f"job {e.to_state}", as_utc(e.at)) for e in events]
        sent = [as_utc(s.sent_at) for s in sends if s.sent_at]
        if sent:
            marks.append(("last send acknowledged", max(sent)))
    return [(name, (at - routed_at).total_seconds()) for name, at in sorted(marks, key=lambda m: m[1])]


def save_outputs(pacs, study_uid: str, job, out_dir: Path) -> dict[str, list[Path]]:
    """Download every output instance from Orthanc into ``out_dir/<kind>/``; returns paths per kind."""
    kinds = {o["series_uid"]: o["kind"] for o in job.outputs.get("series", [])}
    saved: dict[str, list[Path]] = {}
    for series in pacs.study_series(study_uid):
        kind = kinds.get(series["MainDicomTags"].get("SeriesInstanceUID", ""))
        if kind is None:
            continue
        folder = out_dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        for instance in pacs.series_instances(series["ID"]):
            number = int(instance["MainDicomTags"].get("InstanceNumber") or 0)
            path = folder / f"{number:04d}_{instance['ID'][:8]}.dcm"
            path.write_bytes(pacs.download(instance["ID"]))
            saved.setdefault(kind, []).append(path)
    return saved


def hottest_point(files: list[Path]) -> tuple[float, float, float]:
    """The patient position (LPS mm) of the highest voxel of a series (the lesion, for PET)."""
    import numpy as np
    import SimpleITK as sitk

    from dicomnode.imaging.volume import load_series

    image = load_series(files).image
    z, y, x = np.unravel_index(int(np.argmax(sitk.GetArrayViewFromImage(image))), image.GetSize()[::-1])
    return tuple(image.TransformIndexToPhysicalPoint((int(x), int(y), int(z))))


def write_preview(fused_files: list[Path], target: Path, count: int = 4) -> Path:
    """A PNG strip of ``count`` fused slices spread over the series (the ones with most colour first)."""
    import numpy as np
    import pydicom
    from PIL import Image

    slices = sorted((pydicom.dcmread(p) for p in fused_files), key=lambda ds: int(ds.InstanceNumber))
    arrays = [ds.pixel_array for ds in slices]
    # Colourfulness (channel spread) finds slices where the functional overlay shows; spread the
    # picks over those so the strip shows the extent of the uptake, not four neighbours.
    colour = np.array([float((a.max(axis=-1).astype(int) - a.min(axis=-1)).mean()) for a in arrays])
    candidates = np.flatnonzero(colour >= 0.25 * colour.max()) if colour.max() > 0 else np.arange(len(arrays))
    chosen = sorted({int(candidates[int(round(i))]) for i in np.linspace(0, len(candidates) - 1, count)})
    tiles = [Image.fromarray(arrays[i]).resize((256, int(256 * arrays[i].shape[0] / arrays[i].shape[1]))) for i in chosen]
    strip = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)))
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width
    strip.save(target)
    return target


def write_montage(fused_files: list[Path], map_files: dict[str, Path], target: Path, count: int = 3,
                  tile: int = 256, focus: tuple[float, float, float] | None = None) -> Path:
    """A PNG montage: ``count`` fused slices through the lesion (colour bar included, as burned in), and
    below each the same slice of every map (``kind -> Parametric Map file``), on the map's series scale.

    ``focus``: a patient point (LPS mm) in the lesion, e.g. the hottest PET voxel; without it, the
    most colourful fused slice. The slices are the nearest one and its neighbours two apart.
    """
    import numpy as np
    import pydicom
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    from dicomnode.dicomio.parametric_map import decode_parametric_map

    slices = sorted((pydicom.dcmread(p) for p in fused_files), key=lambda ds: int(ds.InstanceNumber))
    arrays = [ds.pixel_array for ds in slices]
    if focus is not None:
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
        iop = np.array([float(v) for v in slices[0].ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:])
        centre = int(np.argmin(np.abs((positions - np.asarray(focus)) @ normal)))
    else:
        colour = np.array([float((a.max(axis=-1).astype(int) - a.min(axis=-1)).mean()) for a in arrays])
        centre = int(np.argmax(colour))
    picks = sorted({int(np.clip(centre + d, 0, len(arrays) - 1)) for d in range(-2 * (count // 2), 2 * (count // 2) + 1, 2)})
    rows = [("fused", [arrays[i] for i in picks])]
    for kind, path in map_files.items():
        values, positions = decode_parametric_map(pydicom.dcmread(path))
        peak = float(values.max()) or 1.0
        frames = []
        for i in picks:
            z = np.asarray([float(v) for v in slices[i].ImagePositionPatient])
            k = int(np.argmin(np.linalg.norm(positions - z, axis=1)))
            frames.append((colormaps["inferno"](np.clip(values[k] / peak, 0, 1))[..., :3] * 255).astype(np.uint8))
        rows.append((f"{kind} (series max {peak:.3g})", frames))
    h, w = arrays[0].shape[:2]
    size = (tile, max(1, int(round(tile * h / w))))
    label_h = 14
    sheet = Image.new("RGB", (size[0] * len(picks), (size[1] + label_h) * len(rows)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for r, (label, frames) in enumerate(rows):
        y = r * (size[1] + label_h)
        draw.text((2, y + 1), label, fill=(255, 255, 255))
        for c, frame in enumerate(frames):
            sheet.paste(Image.fromarray(frame).resize(size, Image.NEAREST), (c * size[0], y + label_h))
    sheet.save(target)
    return target


@dataclass
class DemoRun:
    """What one demo run measured: seconds per processing stage and the audit timeline."""

    study: str
    timings: dict[str, float]
    timeline: list[tuple[str, float]]
    outputs: dict[str, int]


def run_demo(workdir: Path, synthetic: bool, overrides: dict | None = None, summary: bool = True) -> DemoRun:
    """The demo (see the module docstring); ``overrides`` are merged into the node's configuration."""
    import pydicom

    from dicomnode.audit.queries import summary_text
    from dicomnode.config import load_config
    from dicomnode.node import Node
    from dicomnode.testing.orthanc import NodePeer, Orthanc, OrthancError, find_orthanc

    if find_orthanc() is None:
        raise DemoError("Orthanc is not installed (make install installs it with apt-get)")
    demo_dir = workdir / "demo"
    # The demo keeps its own audit DB and spool so a second run starts clean and leaves a
    # node's own var/dicomnode.db alone.
    shutil.rmtree(demo_dir, ignore_errors=True)
    demo_dir.mkdir(parents=True)
    description, study = demo_study(demo_dir, synthetic)
    say(f"study: {description}")
    study_uid = str(pydicom.dcmread(study["CT"][0], stop_before_pixels=True).StudyInstanceUID)
    node_port = _free_port()
    (demo_dir / "orthanc").mkdir()
    pacs = Orthanc(NodePeer("DICOMNODE", "127.0.0.1", node_port), workdir=demo_dir / "orthanc")
    try:
        pacs.start()
    except OrthancError as exc:
        raise DemoError(str(exc)) from exc
    node = None
    try:
        say(f"Orthanc PACS: AE {pacs.ae_title}, DICOM port {pacs.dicom_port}, REST {pacs.url}")
        config = load_config(overrides=_merge({
            "node": {"port": node_port},
            "storage": {"spool_dir": str(demo_dir / "spool"), "database_url": f"sqlite:///{demo_dir / 'dicomnode.db'}"},
            "completion": {"stable_age_s": DEMO_STABLE_AGE_S, "check_interval_s": 0.5},
            "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}],
        }, overrides or {}))
        node = Node(config)
        node.start()
        say(f"node: AE {config.node.ae_title} on 127.0.0.1:{node_port}, audit DB and spool in {demo_dir}")
        say(f"series complete after {DEMO_STABLE_AGE_S:g} s without a new instance "
             f"(demo setting; the default is {load_config().completion.stable_age_s:g} s)")
        started = time.monotonic()
        pacs.upload(study["CT"] + study["PT"])
        say(f"uploaded {len(study['CT']) + len(study['PT'])} instances to Orthanc; Orthanc sends the study to the node")
        routed_at = datetime.now(timezone.utc)
        pacs.route([pacs.lookup(study_uid, "Study")])
        job = wait_for_job(node.db, JOB_TIMEOUT_S)
        if job.state.value != "done":
            print(summary_text(node.db))
            raise DemoError(f"job {job.id} failed: {job.reason}")
        say(f"fused series back in Orthanc {time.monotonic() - started:.1f} s after the upload began")
        marks = timeline(node.db, job.id, routed_at)
        say("timeline (s after Orthanc began sending): " + ", ".join(f"{name} {t:.2f}" for name, t in marks))
        seconds = {k: v for k, v in job.timings.items() if isinstance(v, (int, float))}  # not the CPU (cpu_s)
        say("processing stage seconds: " + ", ".join(f"{k}={v:.2f}" for k, v in seconds.items()))
        saved = save_outputs(pacs, study_uid, job, demo_dir / "instances")
        expected = {o["kind"]: o["count"] for o in job.outputs["series"]}
        got = {k: len(v) for k, v in saved.items()}
        if got != expected:
            raise DemoError(f"Orthanc holds {got} output instances, the node sent {expected}")
        preview = write_preview(saved["fused"], demo_dir / "fused_preview.png")
        # What a newcomer should look at: slices through the lesion, its colour bar, and the maps.
        montage = write_montage(saved["fused"], {k: saved[k][0] for k in ("heatmap", "saliency") if k in saved},
                                demo_dir / "fused_montage.png", focus=hottest_point(study["PT"]))
        say(f"wrote {montage}: fused slices through the lesion (colour bar burned in) and the explanation maps")
        # Orthanc renders the uint16 map (a float one it would not): keep its preview of frame 1.
        heatmap_png = demo_dir / "heatmap_preview.png"
        heatmap_uids = {o["series_uid"] for o in job.outputs["series"] if o["kind"] == "heatmap"}
        for series in pacs.study_series(study_uid):
            if series["MainDicomTags"].get("SeriesInstanceUID") in heatmap_uids:
                heatmap_png.write_bytes(pacs.preview_png(series["Instances"][0]))
        say(f"wrote {preview}, {heatmap_png} and {sum(got.values())} output instances under {demo_dir / 'instances'}")
        if summary:
            print()
            print(summary_text(node.db))
        return DemoRun(description, seconds, marks, got)
    finally:
        if node is not None:
            node.stop()
        pacs.stop()
        say("stopped the node and Orthanc")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out

