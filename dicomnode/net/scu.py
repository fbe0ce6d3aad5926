"""C-STORE SCU: send files to a peer on one association, and a persisted send queue with retries.

The queue keeps one ``Send`` row per (job, output series, destination). ``run_due`` attempts the
sends whose ``next_attempt_at`` has passed; a failure schedules the next attempt after
``min(initial_delay_s * backoff**(attempts-1), max_delay_s)`` and the send is ``failed`` after
``max_attempts``. Because the state is in the database a restarted node resumes where it stopped.
Delivery is at-least-once: a crash between the peer's success status and the database commit
sends the series again, which a PACS stores as the same SOP instances.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from pydicom.filereader import read_file_meta_info
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE, evt
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Send, SendState
from dicomnode.config import Config, Destination, TLSConfig
from dicomnode.log import event as log_event

log = logging.getLogger(__name__)

# Warning statuses (PS3.4 B.2.3): the peer stored the instance, possibly with coercion.
_STORED_WITH_WARNING = {0xB000, 0xB006, 0xB007}
_MAX_CONTEXTS = 128


class SendFailed(Exception):
    """A send did not complete: association refused/failed or an instance got a non-success status."""


@dataclass(frozen=True)
class SendReport:
    """What one association delivered. ``statuses``: SOP Instance UID -> DIMSE status."""

    destination: str
    sent: int
    seconds: float
    statuses: dict[str, int] = field(default_factory=dict)
    # (file, why) of what the peer refused, when the send was asked to skip refusals.
    skipped: tuple[tuple[Path, str], ...] = ()


def client_ssl_context(tls: TLSConfig | None) -> ssl.SSLContext:
    """TLS context for sending: verify the peer (``tls.ca_file`` or system CAs), present our cert if set."""
    cafile = str(tls.ca_file) if tls is not None and tls.ca_file is not None else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls is not None and tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


def _set_nodelay(event) -> None:
    raw = getattr(event.assoc.dul.socket, "socket", None)
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _file_contexts(files: Sequence[Path]) -> list[tuple[Path, str, str, str]]:
    """(path, SOP class, SOP instance, transfer syntax) of each file, from its file meta only."""
    out = []
    for path in files:
        try:
            meta = read_file_meta_info(path)
            out.append((Path(path), str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID)))
        except (OSError, InvalidDicomError, AttributeError) as exc:
            raise SendFailed(f"cannot read {path} as a DICOM file: {exc}") from exc
    return out


def send_files(
    dest: Destination,
    files: Sequence[Path],
    *,
    calling_ae: str,
    timeout_s: float,
    tls: TLSConfig | None = None,
    max_pdu: int = 131072,
    skip_refused: bool = False,
) -> SendReport:
    """C-STORE ``files`` to ``dest`` on one association; raises ``SendFailed`` unless all are stored.

    ``skip_refused``: a file whose presentation context the peer rejected, or that it answered
    with a failure status, is listed in ``SendReport.skipped`` and the send goes on.

    Presentation contexts are the files' own (SOP class, transfer syntax) pairs, so files are sent
    as stored, never transcoded. Warning statuses (0xB000/B006/B007) count as stored.
    ``tls``: CA and client certificate used when ``dest.tls`` is set; ``timeout_s`` bounds connect,
    association negotiation and each response.
    """
    started = time.perf_counter()
    entries = _file_contexts(files)
    if not entries:
        return SendReport(dest.name, 0, 0.0)
    pairs = sorted({(sop_class, syntax) for _, sop_class, _, syntax in entries})
    if len(pairs) > _MAX_CONTEXTS:
        raise SendFailed(f"{len(pairs)} SOP class/transfer syntax pairs exceed one association's {_MAX_CONTEXTS}")
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.maximum_pdu_size = max_pdu
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, syntax)
    tls_args = (client_ssl_context(tls), dest.host) if dest.tls else None
    assoc = ae.associate(
        dest.host,
        dest.port,
        ae_title=dest.ae_title,
        tls_args=tls_args,
        max_pdu=max_pdu,
        evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay)],
    )
    if not assoc.is_established:
        what = "rejected by the peer" if assoc.is_rejected else "failed (peer unreachable, or aborted during negotiation)"
        raise SendFailed(f"association to {dest.ae_title}@{dest.host}:{dest.port} {what}")
    statuses: dict[str, int] = {}
    skipped: list[tuple[Path, str]] = []
    accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
    try:
        for path, sop_class, sop_uid, syntax in entries:
            if skip_refused and (sop_class, syntax) not in accepted:
                skipped.append((path, f"the peer accepted no presentation context for {_sop_class_name(sop_class)} in {syntax}"))
                continue
            status_ds = assoc.send_c_store(path)
            status = int(getattr(status_ds, "Status", -1)) if status_ds is not None else -1
            statuses[sop_uid] = status
            if status == -1:
                raise SendFailed(f"no C-STORE response from {dest.ae_title} for {path.name} (timeout or abort)")
            if status != 0x0000 and status not in _STORED_WITH_WARNING:
                comment = str(getattr(status_ds, "ErrorComment", "") or "")
                refusal = f"{dest.ae_title} answered 0x{status:04X} for {path.name} {comment}".rstrip()
                if not skip_refused:
                    raise SendFailed(refusal)
                skipped.append((path, refusal))
        assoc.release()
    except BaseException:
        assoc.abort()
        raise
    return SendReport(dest.name, len(entries) - len(skipped), time.perf_counter() - started, statuses, tuple(skipped))


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def retry_delay(attempts: int, initial_s: float, backoff: float, max_s: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones (1 -> initial_s)."""
    return min(initial_s * backoff ** max(0, attempts - 1), max_s)


class SendQueue:
    """Persisted sends with bounded exponential backoff (see the module docstring)."""

    def __init__(self, db: AuditDB, config: Config):
        self.db = db
        self.config = config
        self._running = threading.Lock()  # one run_due at a time per process

    def enqueue(self, job_id: int, series_uid: str, destination_name: str, files: Sequence[Path]) -> None:
        """Add a pending send; a second call for the same (job, series, destination) changes nothing."""
        try:
            with self.db.session() as session:
                exists = session.scalar(
                    select(Send.id).where(Send.job_id == job_id, Send.series_uid == series_uid, Send.destination == destination_name)
                )
                if exists is not None:
                    return
                session.add(
                    Send(
                        job_id=job_id,
                        series_uid=series_uid,
                        destination=destination_name,
                        files=[str(p) for p in files],
                        state=SendState.pending,
                        attempts=0,
                        next_attempt_at=datetime.now(timezone.utc),
                    )
                )
        except IntegrityError:
            return  # enqueued concurrently: the unique constraint keeps one row
        log_event(log, "send_queued", job=job_id, series=series_uid, destination=destination_name, files=len(files))

    def run_due(self, now: datetime | None = None) -> list[int]:
        """Attempt every due pending send; return the job ids with a send that reached sent/failed."""
        with self._running:
            now = now or datetime.now(timezone.utc)
            with self.db.session() as session:
                due = session.scalars(
                    select(Send.id).where(Send.state == SendState.pending, Send.next_attempt_at <= now).order_by(Send.id)
                ).all()
            finished: list[int] = []
            for send_id in due:
                job_id, final = self._attempt(send_id, now)
                if final and job_id not in finished:
                    finished.append(job_id)
            return finished

    def _attempt(self, send_id: int, now: datetime) -> tuple[int, bool]:
        with self.db.session() as session:
            row = session.get(Send, send_id)
            job_id, dest_name, files, attempts = row.job_id, row.destination, list(row.files), row.attempts
        sending = self.config.sending
        attempt_no = attempts + 1
        error: str | None = None
        report: SendReport | None = None
        try:
            dest = self.config.destination(dest_name)
            report = send_files(
                dest,
                [Path(f) for f in files],
                calling_ae=self.config.node.ae_title,
                timeout_s=sending.connect_timeout_s,
                tls=self.config.tls,
                max_pdu=self.config.node.max_pdu,
            )
        except KeyError:
            error = f"destination {dest_name!r} is not configured"
        except SendFailed as exc:
            error = str(exc)
        except Exception as exc:  # a bug or OS error must not kill the queue; it is audited like a failure
            error = f"{type(exc).__name__}: {exc}"
        with self.db.session() as session:
            row = session.get(Send, send_id)
            row.attempts = attempt_no
            if error is None:
                row.state = SendState.sent
                row.sent_at = datetime.now(timezone.utc)
                row.last_status = f"attempt {attempt_no}: sent {report.sent} instances in {report.seconds:.2f} s"
            elif attempt_no >= sending.max_attempts:
                row.state = SendState.failed
                row.last_status = f"attempt {attempt_no}: {error}; giving up after {attempt_no} attempts"
            else:
                delay = retry_delay(attempt_no, sending.initial_delay_s, sending.backoff, sending.max_delay_s)
                row.next_attempt_at = now + timedelta(seconds=delay)
                row.last_status = f"attempt {attempt_no}: {error}; next in {delay:.0f} s"
            state = row.state
        level = logging.INFO if error is None else logging.WARNING if state == SendState.pending else logging.ERROR
        log_event(
            log,
            "send_attempt",
            level,
            job=job_id,
            send=send_id,
            destination=dest_name,
            attempt=attempt_no,
            state=state.value,
            instances=report.sent if report else 0,
            seconds=round(report.seconds, 3) if report else None,
            error=error,
        )
        return job_id, state != SendState.pending

    def job_send_state(self, job_id: int) -> Literal["pending", "sent", "failed"]:
        """``failed`` if any send failed, ``sent`` when all are sent (or none exist), else ``pending``."""
        with self.db.session() as session:
            states = set(session.scalars(select(Send.state).where(Send.job_id == job_id)).all())
        if SendState.failed in states:
            return "failed"
        if SendState.pending in states:
            return "pending"
        return "sent"


def _collect(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        else:
            files.append(path)
    return files


def send_command(args) -> int:
    """``dicomnode send PATHS --host --port --ae --calling-ae``: C-STORE files and folders."""
    files = _collect(args.paths)
    dest = Destination(name="cli", ae_title=args.ae, host=args.host, port=args.port)
    try:
        report = send_files(dest, files, calling_ae=args.calling_ae, timeout_s=30.0, skip_refused=True)
    except SendFailed as exc:
        print(f"send failed: {exc}")
        return 1
    for path, why in report.skipped:
        print(f"skipped {path}: {why}")
    rate = report.sent / report.seconds if report.seconds > 0 else 0.0
    print(f"sent {report.sent} instances to {args.ae}@{args.host}:{args.port} in {report.seconds:.2f} s ({rate:.0f}/s)")
    if report.skipped:
        print(f"{len(report.skipped)} files skipped: the peer refused them")
        return 2
    return 0
