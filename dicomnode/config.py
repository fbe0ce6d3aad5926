"""The node's configuration: one validated model of the TOML file; every default lives here.

Each section is a pydantic model that forbids unknown keys, so a typo in the file is an error
with its key path (``pairing.1.moving``), not a silently ignored setting.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicomnode.domain import Modality


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ae_title(value: str) -> str:
    value = value.strip()
    if not 1 <= len(value) <= 16 or "\\" in value or not value.isprintable():
        raise ValueError("an AE title is 1-16 printable characters without backslash")
    return value


class AllowedCaller(_Section):
    """A calling AE that may associate; ``host`` pins it to one peer address."""

    ae_title: str
    host: str | None = None

    _check_ae = field_validator("ae_title")(_ae_title)


class TLSConfig(_Section):
    """TLS for the SCP; destinations opt in one by one with ``tls = true``."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False
    # A connection must finish its TLS handshake within this time, or it is closed (and audited).
    handshake_timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSConfig:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.enabled needs cert_file and key_file")
        return self


class NodeConfig(_Section):
    """The listening application entity."""

    ae_title: str = "DICOMNODE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    max_pdu: int = Field(131072, ge=0, description="bytes; 0 = unlimited")
    tcp_nodelay: bool = True
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    max_associations: int = Field(10, ge=1)
    # Empty: any calling AE is accepted. Otherwise unknown callers are rejected at association.
    allowed_callers: tuple[AllowedCaller, ...] = ()
    # Peers must address the node by its own AE title (called AE); others get A-ASSOCIATE-RJ.
    require_called_ae: bool = True
    # Deflated Explicit VR Little Endian is negotiated only when true; its data sets are inflated
    # under a cap: the pixel data the header declares plus inflate_margin_bytes, never more than
    # max_inflated_bytes.
    accept_deflated: bool = False
    inflate_margin_bytes: int = Field(1_048_576, ge=4096)
    max_inflated_bytes: int = Field(268_435_456, ge=65536)

    _check_ae = field_validator("ae_title")(_ae_title)


class Destination(_Section):
    """A peer the node sends derived series to by C-STORE."""

    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False

    _check_ae = field_validator("ae_title")(_ae_title)


class StorageConfig(_Section):
    spool_dir: Path = Path("var/spool")
    database_url: str = "sqlite:///var/dicomnode.db"

    @field_validator("database_url")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql+psycopg://", "postgresql://")):
            raise ValueError("database_url must be sqlite:///PATH or postgresql+psycopg://...")
        return value


class CompletionConfig(_Section):
    """When a series counts as complete."""

    stable_age_s: float = Field(30.0, gt=0, description="no new instance for this long")
    check_interval_s: float = Field(5.0, gt=0)
    # Complete early once the expected count (e.g. NumberOfSlices of PET/NM) has arrived.
    use_expected_count: bool = True


class PairingRule(_Section):
    """Which series are fused onto which: ``moving`` is resampled onto ``fixed``'s grid."""

    name: str = ""
    fixed: Modality
    moving: Modality
    # "study": same StudyInstanceUID. "patient": same PatientID within max_days.
    match: Literal["study", "patient"] = "study"
    max_days: int = Field(0, ge=0)
    # Fusion method for this rule; None = fusion.default_method.
    method: str | None = None
    # Destination names; empty = the destination whose AE title is the fixed series' sender.
    destinations: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _distinct(self) -> PairingRule:
        if self.fixed == self.moving:
            raise ValueError("fixed and moving must be different modalities")
        return self

    @property
    def label(self) -> str:
        return self.name or f"{self.moving}->{self.fixed}"


def _default_rules() -> tuple[PairingRule, ...]:
    return (
        PairingRule(fixed="CT", moving="PT"),
        PairingRule(fixed="MR", moving="NM"),
        PairingRule(fixed="CT", moving="NM"),
    )


class RegistrationConfig(_Section):
    """Alignment of moving onto fixed (see dicomnode.imaging.register)."""

    # auto: resample only when both series share a FrameOfReferenceUID; always: register anyway.
    mode: Literal["auto", "always", "never"] = "auto"
    stages: tuple[Literal["rigid", "affine", "deformable"], ...] = ("rigid", "affine", "deformable")
    # Start: "auto" keeps the best held-out metric of identity / geometry centres / intensity moments.
    initialization: Literal["auto", "identity", "geometry", "moments"] = "auto"
    # CT soft tissue: voxels in this HU range; CT is clamped to their percentiles (low, high) before
    # mutual information, so bone/air do not swamp the histogram and a head's narrow brain range gets
    # its own bins. (0, 100) clamps to ct_window_hu itself.
    ct_window_hu: tuple[float, float] = (-160.0, 240.0)
    ct_window_percentiles: tuple[float, float] = (2.0, 98.0)
    histogram_bins: int = Field(32, ge=8, le=256)
    # Pyramid voxel sizes (mm) per stage, coarse to fine; never finer than the images themselves.
    rigid_levels_mm: tuple[float, ...] = (8.0, 4.0)
    affine_levels_mm: tuple[float, ...] = (4.0, 2.0)
    # Deformable: one level finer than the affine's; at 2 mm MR <- CT-like stayed at 1.5-1.8 mm TRE
    # (192x192x128 brain cases), at 1.5 mm with the 30 mm grid below 0.82-1.03 mm (mean 0.94, 10 cases).
    deformable_levels_mm: tuple[float, ...] = (1.5,)
    # Random metric samples per pyramid level (cost is per sample, not per voxel). Rigid and affine:
    # 12000; on one thread 20000 cost ~40 % more CPU for the same affine TRE (6 CT/MR cases).
    samples_per_level: int = Field(12000, ge=1000)
    deformable_samples_per_level: int = Field(20000, ge=1000)
    # Optimiser iterations per pyramid level (rigid/affine: conjugate gradient; deformable: L-BFGS-B).
    rigid_iterations: int = Field(100, ge=1)
    affine_iterations: int = Field(100, ge=1)
    # Powell sweeps after the affine gradient descent (value-only: it goes on where the analytic MI
    # gradient stalls); 0 = off. Skipped when the deformable stage follows: the B-spline absorbs the
    # affine residual, and the ~4 s go to it instead.
    affine_polish_iterations: int = Field(3, ge=0)
    # 24: on the 1.5 mm level / 30 mm grid, 30 iterations gained <= 0.02 mm TRE for ~3 s more.
    deformable_iterations: int = Field(24, ge=1)
    # B-spline control point spacing (mm); PET/NM moving images use at least 8x their voxel size.
    # 30 mm: with the +-6 mm coefficient bound the best 40 mm grid fit of a 20 mm-smooth deformation
    # leaves 0.43 mm mean TRE, a 30 mm grid 0.19 mm, and it converged further in the same iterations.
    bspline_spacing_mm: float = Field(30.0, gt=0)
    # The deformable stage runs only when both the fixed and the moving modality are listed ("" = files
    # without a DICOM modality). On generated brain cases it lowers MR<-CT and CT<-MR errors below the
    # best affine fit, and PET-like ones at 2 mm voxels too (1.2-1.3 mm against an affine 2.1-2.2); NM
    # is unmeasured (docs/benchmarks.md).
    deformable_modalities: tuple[str, ...] = ("CT", "MR", "PT")
    # The deformable stage runs only when its finest level (never finer than the moving voxels) is at
    # most this (mm). Coarser, it did not beat the affine stage (CT/MR at 2.5-3 mm; every PET-like case
    # at 3 and 4 mm, with coarser grids, matched blur or a 4 -> 2 mm pyramid too), and held-out MI kept
    # those warps all the same. 2.1: "2 mm" scanner grids are 2.0-2.1 mm.
    deformable_max_level_mm: float = Field(2.1, gt=0)
    # Bound on each B-spline coefficient (mm): MI rewards wild warps of flat regions otherwise.
    bspline_max_displacement_mm: float = Field(6.0, gt=0)
    # Held-out check: samples, and the least relative metric gain for a stage to be kept.
    heldout_samples: int = Field(40000, ge=1000)
    min_improvement: float = Field(0.0, ge=0.0)
    # Series sharing a FrameOfReferenceUID registered anyway (mode "always"): the result replaces the
    # scanner's identity (then also the rigid stage's start) only when it lowers held-out MI by more
    # than this fraction of the identity's value. Real STS_002 PET/CT: aligned, 5-10 % for a 5-6.5 mm
    # drift (held); moved 10 mm, 16-19 % (held); moved 7 mm + 3 deg, over 20 % (registered).
    same_frame_min_improvement: float = Field(0.2, ge=0.0)
    # Refuse (RegistrationFailed) below these: overlapping fixed-mask voxels, slices per volume.
    min_overlap_voxels: int = Field(500, ge=1)
    min_slices: int = Field(4, ge=2)
    # Deformable Spatial Registration object: the B-spline's offsets sampled this far apart (mm, never
    # finer than the fixed voxels); 3 mm keeps linear interpolation of a 30 mm grid well under 0.1 mm.
    dicom_grid_mm: float = Field(3.0, gt=0)
    # SimpleITK threads of the deformable stage and the held-out checks; 0 = all cores. The rigid and
    # affine stages run on one thread: ITK sums a threaded Mattes MI gradient in the order the threads
    # take a lock, and the line searches turned that 1e-16 noise into different optima (4e-5 of MI,
    # 0.09 mm TRE apart between two processes). The held-out value sums per thread in a fixed order.
    threads: int = Field(0, ge=0)
    # Seed of every metric sampler (any value, 0 included: never SimpleITK's wall clock).
    seed: int = 1

    @field_validator("ct_window_hu", "ct_window_percentiles")
    @classmethod
    def _ordered_pair(cls, value: tuple[float, float], info) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"{info.field_name} must be (low, high) with low < high")
        if info.field_name == "ct_window_percentiles" and not (0.0 <= value[0] and value[1] <= 100.0):
            raise ValueError("ct_window_percentiles must lie within 0..100")
        return value


class FusionConfig(_Section):
    """Intensity preparation and fusion (see dicomnode.fusion)."""

    # Colour on luminance (fusion.chroma): the only method that keeps at least what the standard
    # viewer overlay keeps of both sources on PT->CT and MR->CT (docs/benchmarks.md, clinical
    # fidelity); "network" is the trained network (models/MODEL_CARD.md), "alpha" the simple overlay.
    default_method: str = "chroma"
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the moving image")
    # Colour map for functional (PT/NM) images: hot | jet | pet | gray.
    colormap: str = "hot"
    # Relative paths are tried from the working directory, then from the installed package (which
    # ships models/fusion_net.pt as package data).
    weights: Path = Path("models/fusion_net.pt")
    batch_size: int = Field(16, ge=1)
    # CT windows (center, width) in HU; the brain window applies to head body parts.
    ct_window: tuple[float, float] = (40.0, 400.0)
    ct_brain_window: tuple[float, float] = (40.0, 80.0)
    # MR and NM: robust percentiles (low, high) of the non-zero voxels mapped to 0 and 1.
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    nm_percentiles: tuple[float, float] = (0.0, 99.5)
    # PET: 0 up to the series' pet_percentile inside the PET field of view, in SUV at least
    # pet_suv_max_floor: the range a reader's viewer shows, SUV 0..max(p99.9, 5) (docs/benchmarks.md,
    # clinical fidelity), taken once per series. pet_suv_max > 0 fixes the SUV bound instead.
    pet_suv_max: float = Field(0.0, ge=0)
    pet_percentile: float = Field(99.9, gt=0, le=100)
    pet_suv_max_floor: float = Field(5.0, ge=0)
    # Moving-signal threshold of the alpha overlay, as a fraction of the prepared range.
    alpha_threshold: float = Field(0.02, ge=0.0, lt=1.0)
    # Also compute the Grad-CAM saliency map (network method; costs one backward pass per batch).
    saliency: bool = True
    # Contribution map: luminance differences |moving - fixed| well below this (prepared 0..1 scale)
    # count as "both sources agree" and give the moving image no share (fusion.explain.luminance_share).
    contribution_tau: float = Field(0.05, gt=0, le=1)
    # Chroma method: the colour map whose chroma shows the moving value, its strength, the fade-in
    # (pixels) inside the moving field-of-view edge, and per moving modality the luminance lift
    # (fixed image on Y in [lift, 1 - lift]) that lets black and white pixels carry colour (without it
    # the synthetic NM tumour's function fell below the viewer overlay's, docs/benchmarks.md).
    chroma_colormap: str = "fusion"
    chroma_saturation: float = Field(1.0, gt=0, le=4)
    chroma_feather_px: int = Field(4, ge=0, le=64)
    chroma_lift: dict[str, float] = Field(default_factory=lambda: {"MR": 0.05, "CT": 0.05, "NM": 0.05})


class QualityConfig(_Section):
    """Fusion metrics computed per fused series (see dicomnode.quality)."""

    metrics: tuple[str, ...] = ("EN", "MI", "SSIM", "Qabf", "VIF")
    # Per-series limits; a series worse than any of them is flagged in the audit log. A limit is a
    # minimum for higher-is-better metrics and a maximum for MSE and Qcv (dicomnode.quality.names).
    thresholds: dict[str, float] = Field(default_factory=dict)
    # Round the fused image half away from zero to 8 bits before scoring (the published convention).
    round_fused: bool = True
    # Slices scored per series (0: every slice with content, prepared and scored 16 at a time): evenly
    # spread, plus the slice with the most moving-image signal; keeps the quality stage a bounded share of the job.
    max_slices: int = Field(16, ge=0)
    # DFRS feature mask for PET: voxels with SUV at or above this value (g/ml).
    suv_threshold: float = Field(2.5, gt=0)
    # DFRS feature mask for other functional images: at or above this fraction of the moving range.
    feature_threshold: float = Field(0.5, gt=0, le=1)

    @field_validator("metrics", "thresholds")
    @classmethod
    def _known_metrics(cls, value):
        from dicomnode.quality.names import METRIC_NAMES

        unknown = sorted(set(value) - set(METRIC_NAMES))
        if unknown:
            raise ValueError(f"unknown metric names {unknown}; known: {', '.join(METRIC_NAMES)}")
        return value


class ProcessingConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Fixed slices fused, explained and encoded at a time; also caps fusion.batch_size (a slab is
    # whole batches). Bounds memory: the network's Grad-CAM graph costs ~190 MB per 512x512 slice.
    slab_slices: int = Field(2, ge=1)
    # torch CPU threads for fusion; 0 = torch's default (one per core). On cores shared with other
    # work, 1 halves the CPU per slice (idle threads spin while they wait for a core).
    threads: int = Field(0, ge=0)


class WorkerConfig(_Section):
    """Processing workers. ``serve`` runs one in-process unless ``in_serve`` is false; more run as
    ``dicomnode worker`` (on PostgreSQL they share the job queue, also from other machines)."""

    in_serve: bool = True
    lease_s: float = Field(60.0, gt=0, description="a claim lasts this long, renewed every lease_s/3 while processing")
    poll_s: float = Field(2.0, gt=0, description="how often an idle worker looks for jobs")
    max_attempts: int = Field(3, ge=1, description="a job whose worker died this many times fails")


class SendingConfig(_Section):
    """C-STORE SCU retries: after failed attempt n the next waits min(initial_delay_s * backoff**(n-1), max_delay_s).

    The defaults wait 30, 60, 120, 240, 480 s, then 900 s four times: the 10th and last attempt
    comes 75 min after the first, so a destination down for an hour still gets everything (mercure
    retries 5 x 900 s). ``connect_timeout_s`` bounds connect and association negotiation;
    ``response_timeout_s`` bounds the wait for each C-STORE response (a busy PACS may take a while).
    """

    max_attempts: int = Field(10, ge=1)
    initial_delay_s: float = Field(30.0, ge=0)
    max_delay_s: float = Field(900.0, ge=0)
    backoff: float = Field(2.0, ge=1.0)
    connect_timeout_s: float = Field(15.0, gt=0)
    response_timeout_s: float = Field(60.0, gt=0)
    poll_s: float = Field(2.0, gt=0, description="longest a destination's sender sleeps between looks at its due sends")
    # A crash re-sends at most this many seconds' worth of acknowledged instances; one commit per
    # instance halved the send rate on SQLite.
    ack_commit_every_s: float = Field(0.25, ge=0, description="how often acknowledgements are committed mid-series")


class RetentionConfig(_Section):
    """How long spooled instances and outputs are kept after their job ended; 0 = forever."""

    spool_days: int = Field(7, ge=0)
    audit_days: int = Field(0, ge=0)
    every_h: float = Field(6.0, gt=0, description="hours between two purges")


class OutputConfig(_Section):
    """The derived series: numbered series_number_base + 10 x job id + the kind's offset
    (``dicomnode.domain.SERIES_OFFSETS``), so two jobs of one study never share a number."""

    series_number_base: int = Field(9000, ge=0, le=2**31 - 10**9, description="room for a billion jobs in IS")


class HttpConfig(_Section):
    """The monitoring endpoint: ``/health`` and ``/metrics`` (Prometheus) over plain HTTP."""

    enabled: bool = False
    # Loopback by default: the endpoint has no authentication; expose it through a proxy or firewall.
    host: str = "127.0.0.1"
    port: int = Field(9112, ge=0, le=65535, description="0 = any free port")
    # Upper bounds (seconds) of the job stage duration histogram buckets.
    stage_buckets_s: tuple[float, ...] = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["kv", "json"] = "kv"


class Config(_Section):
    """The whole node configuration."""

    node: NodeConfig = NodeConfig()
    tls: TLSConfig = TLSConfig()
    destinations: tuple[Destination, ...] = ()
    storage: StorageConfig = StorageConfig()
    completion: CompletionConfig = CompletionConfig()
    pairing: tuple[PairingRule, ...] = Field(default_factory=_default_rules)
    registration: RegistrationConfig = RegistrationConfig()
    fusion: FusionConfig = FusionConfig()
    quality: QualityConfig = QualityConfig()
    processing: ProcessingConfig = ProcessingConfig()
    worker: WorkerConfig = WorkerConfig()
    sending: SendingConfig = SendingConfig()
    retention: RetentionConfig = RetentionConfig()
    output: OutputConfig = OutputConfig()
    http: HttpConfig = HttpConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _rule_destinations_exist(self) -> Config:
        names = {d.name for d in self.destinations}
        if len(names) != len(self.destinations):
            raise ValueError("destination names must be unique")
        for rule in self.pairing:
            unknown = set(rule.destinations) - names
            if unknown:
                raise ValueError(f"pairing rule {rule.label} names unknown destinations {sorted(unknown)}")
        return self

    @model_validator(mode="after")
    def _retention_keeps_pairable_series(self) -> Config:
        # Spool files go by age; a patient rule pairs across studies up to max_days apart, so a
        # series must outlive that window or its partner's job would find it deleted.
        days = self.retention.spool_days
        for rule in self.pairing:
            if rule.match == "patient" and 0 < days <= rule.max_days:
                raise ValueError(
                    f"retention.spool_days = {days} would delete received series that pairing rule {rule.label} "
                    f"(match = \"patient\", max_days = {rule.max_days}) can still pair: set spool_days to at "
                    f"least {rule.max_days + 1}, or 0 to keep spool files forever")
        return self

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    def destination_for_ae(self, ae_title: str) -> Destination | None:
        """The configured destination whose AE title is ``ae_title`` (the default return path)."""
        return next((d for d in self.destinations if d.ae_title == ae_title), None)


class ConfigError(Exception):
    """The configuration file cannot be used; ``problems`` lists ``key.path: message`` lines."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__(f"{source}: " + "; ".join(problems))


def load_config(path: Path | str | None = None, overrides: dict | None = None) -> Config:
    """Read and validate a TOML file (None: the embedded defaults), then apply ``overrides``."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(source, [str(exc)]) from exc
    if overrides:
        data = _merge(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(err) for err in exc.errors()]) from exc


def _describe(err: dict) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "<root>"
    return f"{path}: {err['msg']}"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
