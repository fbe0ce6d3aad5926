"""The monitoring endpoint: ``GET /health`` and ``GET /metrics`` (Prometheus), started with the node.

Metrics are read from the audit database at each scrape by a custom collector, so the code that
receives, pairs, processes and sends carries no metric hooks, and the figures survive restarts.
Counters come from audit rows: when retention deletes old rows they go down, which Prometheus
treats as a counter reset (``rate()`` and ``increase()`` stay right).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import case, func, select, text

from dicomnode.audit.models import Association, Instance, Job, JobState, Rejection, Send, SendState, Series, SeriesState
from dicomnode.log import event

if TYPE_CHECKING:
    from dicomnode.node import Node

log = logging.getLogger(__name__)

PENDING_JOB_STATES = (JobState.paired, JobState.processing)


class MonitoringError(RuntimeError):
    """The monitoring endpoint cannot listen; the message names the address."""


@dataclass(frozen=True)
class Check:
    ok: bool
    reason: str = ""


def check_health(node: Node) -> dict[str, Check]:
    """The node's readiness, one check per part: SCP listening, database, spool, worker thread."""
    checks = {"scp": Check(True) if node.scp.listening else Check(False, "the DICOM listener is not running")}
    try:
        with node.db.session() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = Check(True)
    except Exception as exc:
        checks["database"] = Check(False, f"audit database does not answer: {type(exc).__name__}: {exc}")
    checks["spool"] = _spool_writable(node.spool)
    checks["worker"] = Check(True) if node.worker.alive else Check(False, "the processing worker thread is not running")
    return checks


def _spool_writable(spool) -> Check:
    """Create and delete a file in each spool area: what receiving, quarantine and output need."""
    for area in (spool.incoming, spool.quarantine_dir, spool.outbox):
        try:
            with tempfile.NamedTemporaryFile(dir=area, prefix=".health-"):
                pass
        except OSError as exc:
            return Check(False, f"spool area {area} is not writable: {exc.strerror or exc}")
    return Check(True)


def _tree_size(root: Path) -> tuple[int, int]:
    """(files, bytes) under ``root``; files vanishing meanwhile (retention, moves) are skipped."""
    files = size = 0
    for folder, _dirs, names in os.walk(root):
        for name in names:
            try:
                size += os.stat(os.path.join(folder, name)).st_size
                files += 1
            except FileNotFoundError:
                continue
    return files, size


class AuditCollector:
    """Prometheus families computed from the audit database, the spool and the health checks."""

    def __init__(self, node: Node):
        self.node = node
        self.buckets = tuple(sorted(node.config.http.stage_buckets_s))

    def describe(self):
        return []  # families depend on the data; no up-front description (collected at each scrape)

    def collect(self):
        checks = check_health(self.node)
        health = GaugeMetricFamily("dicomnode_health_check", "1 when the health check passes", labels=["check"])
        for name, check in checks.items():
            health.add_metric([name], 1.0 if check.ok else 0.0)
        yield health
        if checks["database"].ok:
            try:
                yield from self._audit_families()
            except Exception as exc:  # a scrape must still answer: health shows the database state
                event(log, "metrics_audit_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}")
        yield from self._spool_families()
        yield from self._gpu_families()

    # -- audit database ------------------------------------------------------------------------
    def _audit_families(self):
        with self.node.db.session() as s:
            received = s.execute(select(Series.modality, func.count(Instance.id))
                                 .join(Instance, Instance.series_id == Series.id).group_by(Series.modality)).all()
            rejected = s.execute(select(Rejection.status, func.count()).group_by(Rejection.status)).all()
            assocs = s.execute(select(Association.accepted, func.count()).group_by(Association.accepted)).all()
            completed = s.execute(select(Series.completion_reason, func.count())
                                  .where(Series.state == SeriesState.complete).group_by(Series.completion_reason)).all()
            receiving = s.scalar(select(func.count()).select_from(Series).where(Series.state == SeriesState.receiving))
            jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            timings = s.scalars(select(Job.timings).where(Job.state.not_in(PENDING_JOB_STATES))).all()
            failed_attempts = Send.attempts - case((Send.state == SendState.sent, 1), else_=0)
            sends = s.execute(select(Send.destination, Send.state, func.count(), func.sum(Send.attempts),
                                     func.sum(failed_attempts)).group_by(Send.destination, Send.state)).all()

        family = CounterMetricFamily("dicomnode_instances_received", "Instances stored, by modality", labels=["modality"])
        for modality, n in received:
            family.add_metric([modality or ""], n)
        yield family
        family = CounterMetricFamily("dicomnode_instances_rejected",
                                     "Refused instances and associations, by DIMSE status (none: refused association)",
                                     labels=["status"])
        for status, n in rejected:
            family.add_metric(["none" if status is None else f"0x{status:04X}"], n)
        yield family
        family = CounterMetricFamily("dicomnode_associations", "Associations requested", labels=["result"])
        counts = {bool(k): v for k, v in assocs}
        for result, flag in (("accepted", True), ("refused", False)):
            family.add_metric([result], counts.get(flag, 0))
        yield family
        family = CounterMetricFamily("dicomnode_series_completed", "Series completed, by why", labels=["reason"])
        for reason, n in completed:
            family.add_metric([reason or ""], n)
        yield family
        yield GaugeMetricFamily("dicomnode_series_receiving", "Series still receiving", value=receiving or 0)
        family = GaugeMetricFamily("dicomnode_jobs", "Jobs in the audit database, by state", labels=["state"])
        for state in JobState:
            family.add_metric([state.value], jobs.get(state, 0))
        yield family
        yield GaugeMetricFamily("dicomnode_pending_jobs", "Jobs waiting for or in processing",
                                value=sum(jobs.get(st, 0) for st in PENDING_JOB_STATES))
        yield self._stage_histogram(timings)

        attempts = CounterMetricFamily("dicomnode_send_attempts", "C-STORE send attempts, by destination",
                                       labels=["destination"])
        failures = CounterMetricFamily("dicomnode_send_failures", "Send attempts that did not deliver, by destination",
                                       labels=["destination"])
        by_state = GaugeMetricFamily("dicomnode_sends", "Output series sends, by destination and state",
                                     labels=["destination", "state"])
        per_dest: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        pending = 0
        for dest, state, n, tried, failed in sends:
            per_dest[dest][0] += int(tried or 0)
            per_dest[dest][1] += int(failed or 0)
            by_state.add_metric([dest, state.value], n)
            pending += n if state == SendState.pending else 0
        for dest, (tried, failed) in sorted(per_dest.items()):
            attempts.add_metric([dest], tried)
            failures.add_metric([dest], failed)
        yield from (attempts, failures, by_state)
        yield GaugeMetricFamily("dicomnode_pending_sends", "Sends waiting for their (next) attempt", value=pending)

    def _stage_histogram(self, timings: list[dict]) -> HistogramMetricFamily:
        """Per-stage seconds of processed jobs (``Job.timings``) as one histogram per stage."""
        counts: dict[str, list[int]] = {}
        sums: dict[str, float] = defaultdict(float)
        for row in timings:
            for stage, seconds in (row or {}).items():
                if stage == "total_s" or not isinstance(seconds, (int, float)):
                    continue
                counts.setdefault(stage, [0] * (len(self.buckets) + 1))[bisect_left(self.buckets, seconds)] += 1
                sums[stage] += float(seconds)
        family = HistogramMetricFamily("dicomnode_job_stage_seconds", "Seconds per processing stage of each job",
                                       labels=["stage"])
        for stage in sorted(counts):
            cumulative, running = [], 0
            for bound, n in zip((*map(str, self.buckets), "+Inf"), counts[stage]):
                running += n
                cumulative.append((bound, running))
            family.add_metric([stage], cumulative, sum_value=sums[stage])
        return family

    # -- spool and GPU -------------------------------------------------------------------------
    def _spool_families(self):
        spool = self.node.spool
        size = GaugeMetricFamily("dicomnode_spool_bytes", "Bytes in the spool, by area", labels=["area"])
        files = GaugeMetricFamily("dicomnode_spool_files", "Files in the spool, by area", labels=["area"])
        for area, path in (("incoming", spool.incoming), ("quarantine", spool.quarantine_dir), ("outbox", spool.outbox)):
            n, total = _tree_size(path)
            size.add_metric([area], total)
            files.add_metric([area], n)
        yield from (size, files)

    def _gpu_families(self):
        # Only a torch the worker already imported: a scrape must not pull in (or initialise) CUDA.
        torch = sys.modules.get("torch")
        cuda = torch is not None and self.node.config.processing.device != "cpu" and torch.cuda.is_available()
        busy = False
        if cuda:
            with self.node.db.session() as s:
                busy = bool(s.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.processing)))
        yield GaugeMetricFamily("dicomnode_gpu_in_use", "1 while a job is processed on a CUDA device", value=int(busy))
        allocated = torch.cuda.memory_allocated() if cuda and torch.cuda.is_initialized() else 0
        yield GaugeMetricFamily("dicomnode_gpu_memory_allocated_bytes", "CUDA memory held by torch tensors",
                                value=allocated)


def make_registry(node: Node) -> CollectorRegistry:
    """One registry per node (no global state): audit-derived families plus the process's own."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AuditCollector(node))
    ProcessCollector(namespace="dicomnode", registry=registry)
    return registry


class MonitoringServer:
    """``/health`` and ``/metrics`` on a threaded stdlib HTTP server; ``start``/``stop`` with the node."""

    def __init__(self, node: Node):
        self.node = node
        self.registry = make_registry(node)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self.node.config.http.port

    def start(self) -> None:
        cfg = self.node.config.http
        try:
            self._server = ThreadingHTTPServer((cfg.host, cfg.port), _handler(self))
        except OSError as exc:
            raise MonitoringError(f"cannot listen for HTTP on {cfg.host}:{cfg.port}: {exc}") from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="dicomnode-http", daemon=True)
        self._thread.start()
        event(log, "http_listening", host=cfg.host, port=self.port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        self._server = self._thread = None
        event(log, "http_stopped")

    def health(self) -> tuple[int, dict]:
        checks = check_health(self.node)
        failed = {name: c.reason for name, c in checks.items() if not c.ok}
        body = {"status": "unavailable" if failed else "ok",
                "checks": {name: {"ok": c.ok, **({"reason": c.reason} if c.reason else {})} for name, c in checks.items()}}
        if failed:
            event(log, "health_failed", logging.WARNING, **failed)
        return (503 if failed else 200), body


def _handler(monitor: MonitoringServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "dicomnode"

        def do_GET(self):  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/health":
                status, body = monitor.health()
                self._reply(status, "application/json", json.dumps(body).encode())
            elif path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept"))
                self._reply(200, content_type, encoder(monitor.registry))
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found: try /health or /metrics\n")

        def _reply(self, status: int, content_type: str, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
            event(log, "http_request", logging.DEBUG, peer=self.client_address[0], request=format % args)

    return Handler
