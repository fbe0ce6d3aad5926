"""Storage SCP: accept associations, answer C-ECHO, and take C-STORE into the spool and audit DB.

A C-STORE handler only validates, writes the file atomically (fsynced) and records the instance;
the success status goes out after both. Everything else (completion, pairing, processing) runs
elsewhere; ``on_instance(series_uid, progress)`` lets it know that a series grew and where it
stands (``SeriesProgress``, from the instance's own transaction). The audit rows
themselves are written by ``dicomnode.net.records``.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

from pydicom import uid as U
from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.sop_class import Verification

from dicomnode.audit.db import AuditDB
from dicomnode.config import Config, TLSConfig
from dicomnode.log import event as log_event
from dicomnode.net.records import ReceiveRecorder, Recorded
from dicomnode.net.server import start_server
from dicomnode.net.validate import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    ALL_STORAGE_SOP_CLASSES,
    InstanceInfo,
    RejectedInstance,
    accepted_transfer_syntaxes,
    check_instance,
    read_deflated_header,
    read_header,
)
from dicomnode.store.series import SeriesProgress
from dicomnode.store.spool import Spool, SpoolError, part10_header

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected-permanent, service-user, calling-/called-AE-title-not-recognized (PS3.8 9.3.4).
_REJECT_UNKNOWN_CALLER = (0x01, 0x01, 0x03)
_REJECT_UNKNOWN_CALLED = (0x01, 0x01, 0x07)
# Lock stripes for SOP Instance UIDs in flight (more stripes than max_associations: rare waits).
_INSTANCE_LOCKS = 64


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """The SCP's TLS context from ``config.tls`` (None when TLS is off); TLS 1.2 or newer."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        context.load_verify_locations(str(tls.ca_file))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return context


def _set_nodelay(sock: object) -> None:
    raw = getattr(sock, "socket", None)
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # the peer already closed; nothing to tune


def _printable(text: str) -> str:
    """``text`` with control characters (a NUL in a UID) escaped as ``\\xNN``."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]  # LO: at most 64 characters
    return ds


class StoreSCP:
    """The node's listening AE (see the module docstring). ``start`` returns once it listens."""

    def __init__(
        self,
        config: Config,
        db: AuditDB,
        spool: Spool,
        on_instance: Callable[[str, SeriesProgress | None], None] | None = None,
    ):
        self.config = config
        self.db = db
        self.spool = spool
        self.on_instance = on_instance
        self._server = None
        # pynetdicom Association object -> (audit row id, how it ended); one entry per live association.
        self._associations: dict[object, list] = {}
        self._lock = threading.Lock()
        # Concurrent C-STOREs of one SOP Instance UID: the second waits, then finds the first's row
        # (without this it replaced the first copy's spool file while the row kept its sha256).
        self._instance_locks = [threading.Lock() for _ in range(_INSTANCE_LOCKS)]
        self.records = ReceiveRecorder(db)

    # -- lifecycle -------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.maximum_associations = node.max_associations
        syntaxes = accepted_transfer_syntaxes(deflated=node.accept_deflated)
        ae.add_supported_context(Verification)
        for sop_class in sorted(ALL_STORAGE_SOP_CLASSES):
            ae.add_supported_context(sop_class, syntaxes)
        return ae

    def start(self) -> None:
        """Listen on ``config.node.host:port`` in background threads (non-blocking)."""
        if self._server is not None:
            return
        node = self.config.node
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = start_server(
            self._make_ae(),
            (node.host, node.port),
            tls_context=server_ssl_context(self.config.tls),
            handshake_timeout_s=self.config.tls.handshake_timeout_s,
            on_handshake_failed=self._on_handshake_failed,
            evt_handlers=handlers,
        )
        log_event(log, "scp_listening", ae=node.ae_title, host=node.host, port=self.port, tls=self.config.tls.enabled)

    def stop(self) -> None:
        """Stop listening and end open associations."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        log_event(log, "scp_stopped", ae=self.config.node.ae_title)

    @property
    def listening(self) -> bool:
        """True while the server socket is open (the health check's "SCP accepts")."""
        return self._server is not None and self._server.socket.fileno() != -1

    @property
    def port(self) -> int:
        """The TCP port listened on (the real one when the configured port is 0)."""
        if self._server is None:
            return self.config.node.port
        return int(self._server.server_address[1])

    # -- association events ----------------------------------------------------------------
    def _on_conn_open(self, event) -> None:
        if self.config.node.tcp_nodelay:
            # pynetdicom leaves Nagle on; with small PDUs (command sets, responses) it adds ~40 ms.
            _set_nodelay(event.assoc.dul.socket)

    def _caller_allowed(self, calling_ae: str, host: str) -> bool:
        allowed = self.config.node.allowed_callers
        if not allowed:
            return True
        return any(c.ae_title == calling_ae and (c.host is None or c.host == host) for c in allowed)

    def _record_association(self, event, accepted: bool, reason: str | None) -> int | None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        return self.records.association(
            calling_ae=str(getattr(primitive, "calling_ae_title", "") or "").strip(),
            called_ae=str(getattr(primitive, "called_ae_title", "") or "").strip(),
            peer_host=str(assoc.requestor.address),
            peer_port=int(assoc.requestor.port or 0),
            accepted=accepted,
            reason=reason,
        )

    def _on_handshake_failed(self, host: str, port: int, reason: str) -> None:
        self.records.association(calling_ae="", called_ae="", peer_host=host, peer_port=port, accepted=False, reason=reason)

    def _on_requested(self, event) -> None:
        primitive = event.assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        host = str(event.assoc.requestor.address)
        if not self._caller_allowed(calling, host):
            reason, diagnostic = f"calling AE {calling!r} from {host} is not an allowed caller", _REJECT_UNKNOWN_CALLER
        elif self.config.node.require_called_ae and called != self.config.node.ae_title:
            reason, diagnostic = f"called AE {called!r} is not this node's AE title", _REJECT_UNKNOWN_CALLED
        else:
            return
        event.assoc.acse.send_reject(*diagnostic)
        self._record_association(event, accepted=False, reason=reason)
        log_event(log, "association_rejected", logging.WARNING, calling_ae=calling, peer=host, reason=reason)
        event.assoc.kill()

    def _on_accepted(self, event) -> None:
        assoc_id = self._record_association(event, accepted=True, reason=None)
        with self._lock:
            self._associations[event.assoc] = [assoc_id, None]
        rejected = event.assoc.rejected_contexts
        if rejected:
            self._audit_rejected_contexts(event.assoc, assoc_id, rejected)

    def _audit_rejected_contexts(self, assoc, assoc_id: int | None, rejected) -> None:
        """One log line per association; a Rejection row only when nothing storable was accepted.

        SCUs such as storescu propose every storage class they know, so unsupported contexts are
        routine; an association that can store nothing at all is a misconfigured sender.
        """
        calling = assoc.requestor.ae_title
        classes = sorted({str(c.abstract_syntax) for c in rejected})
        storable = [c for c in assoc.accepted_contexts if str(c.abstract_syntax) in ALL_STORAGE_SOP_CLASSES]
        level = logging.INFO if storable else logging.WARNING
        log_event(log, "contexts_rejected", level, id=assoc_id, calling_ae=calling, count=len(rejected), sop_classes=",".join(classes[:5]))
        if not storable and any(c != Verification for c in classes):
            reason = "presentation contexts rejected, SOP class or transfer syntaxes not supported: " + ",".join(classes)
            self.records.rejection(assoc_id, calling, classes[0], "", None, reason, None)

    def _on_rejected(self, event) -> None:
        # Rejections by pynetdicom itself (e.g. too many associations); ours are in _on_requested.
        primitive = event.assoc.acceptor.primitive
        reason = f"rejected by the node: result={primitive.result} source={primitive.result_source} diagnostic={primitive.diagnostic}"
        self._record_association(event, accepted=False, reason=reason)
        log_event(log, "association_rejected", logging.WARNING, peer=event.assoc.requestor.address, reason=reason)

    def _on_ended(self, event) -> None:
        with self._lock:
            entry = self._associations.get(event.assoc)
            if entry is not None and entry[1] is None:
                entry[1] = "released" if event.event is evt.EVT_RELEASED else "aborted"

    def _on_conn_close(self, event) -> None:
        with self._lock:
            entry = self._associations.pop(event.assoc, None)
        if entry is None or entry[0] is None:
            return
        assoc_id, outcome = entry
        outcome = outcome or "connection closed"
        self.records.association_ended(assoc_id, outcome)
        log_event(log, "association_ended", id=assoc_id, outcome=outcome)

    def _association_id(self, assoc) -> int | None:
        with self._lock:
            entry = self._associations.get(assoc)
        return entry[0] if entry else None

    # -- DIMSE -----------------------------------------------------------------------------
    def _on_echo(self, event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event):
        started = time.perf_counter()
        assoc = event.assoc
        assoc_id = self._association_id(assoc)
        calling = assoc.requestor.ae_title
        request = event.request
        sop_class = str(request.AffectedSOPClassUID or "")
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        syntax = str(event.context.transfer_syntax)
        try:
            # Stored as received, behind a file meta header: never decoded and re-encoded.
            body = request.DataSet.getvalue()
            raw = (part10_header(sop_class, sop_uid, syntax, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION), body)
        except Exception as exc:
            return self._reject(None, assoc_id, calling, sop_class, sop_uid, RejectedInstance(STATUS_CANNOT_UNDERSTAND, f"no data set: {exc}"))
        try:
            info = self._check(event, body, sop_class, sop_uid, syntax)
        except RejectedInstance as exc:
            return self._reject(raw, assoc_id, calling, sop_class, sop_uid, exc)
        try:
            recorded = self._store(raw, len(raw[0]) + len(body), info, assoc_id, calling)
        except RejectedInstance as exc:
            return self._reject(raw, assoc_id, calling, sop_class, sop_uid, exc)
        outcome = recorded.outcome
        log_event(
            log,
            "instance_stored" if outcome == "stored" else "instance_duplicate",
            logging.DEBUG if outcome == "stored" else logging.INFO,
            series=info.series_uid,
            sop=info.sop_instance_uid,
            modality=info.modality,
            size=len(body),
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        if self.on_instance is not None and outcome == "stored":
            try:
                self.on_instance(info.series_uid, recorded.progress)
            except Exception as exc:  # the instance is safely stored; a listener bug must not fail it
                log_event(log, "on_instance_failed", logging.ERROR, series=info.series_uid, error=repr(exc))
        return STATUS_SUCCESS

    def _check(self, event, body: bytes, sop_class: str, sop_uid: str, syntax: str) -> InstanceInfo:
        """Validate the received data set; only compressed or unusual syntaxes are fully decoded."""
        try:
            if syntax == U.DeflatedExplicitVRLittleEndian:
                node = self.config.node
                header = read_deflated_header(body, node.inflate_margin_bytes, node.max_inflated_bytes)
            else:
                header = read_header(body, syntax)
            if header is not None:
                ds, pixels = header
                return check_instance(ds, sop_class, sop_uid, syntax, header_only=True, pixels=pixels)
            ds = event.dataset
        except RejectedInstance:
            raise
        except Exception as exc:
            raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, f"data set cannot be decoded: {exc}") from exc
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            # The decoder plugins read the syntax from file meta, which the network copy lacks.
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = syntax
        return check_instance(ds, sop_class, sop_uid, syntax)

    def _store(self, raw, size: int, info: InstanceInfo, assoc_id: int | None, calling: str) -> Recorded:
        """Spool then record one valid instance (``Recorded``); RejectedInstance on failure.

        One pooled connection does the duplicate check, then (after the durable spool write) one
        short write transaction (see ReceiveRecorder.instance).
        """
        lock = self._instance_locks[hash(info.sop_instance_uid) % _INSTANCE_LOCKS]
        with lock, self.records.connect() as conn:
            if self.records.is_duplicate(conn, info.sop_instance_uid):
                return Recorded("duplicate")
            try:
                path = self.spool.write_incoming(raw, study_uid=info.study_uid, series_uid=info.series_uid, sop_uid=info.sop_instance_uid)
            except SpoolError as exc:
                raise RejectedInstance(STATUS_OUT_OF_RESOURCES, f"cannot write to the spool: {exc}") from exc
            digest = hashlib.sha256(raw[0])
            digest.update(raw[1])
            try:
                return self.records.instance(conn, info, path, size, digest.hexdigest(), assoc_id, calling)
            except RejectedInstance:
                # No row will point at the file: remove it so spool and audit agree.
                path.unlink(missing_ok=True)
                raise

    def _reject(self, raw, assoc_id, calling, sop_class, sop_uid, exc: RejectedInstance) -> Dataset:
        # A malformed UID may hold a NUL or control characters, which PostgreSQL text refuses.
        sop_class, sop_uid = _printable(sop_class), _printable(sop_uid)
        quarantine_path = None
        if raw is not None:
            try:
                quarantine_path = str(self.spool.quarantine(raw, f"status=0x{exc.status:04X} calling_ae={calling} sop={sop_uid}\n{exc.reason}"))
            except SpoolError as qexc:
                log_event(log, "quarantine_failed", logging.ERROR, error=str(qexc))
        self.records.rejection(assoc_id, calling, sop_class, sop_uid, exc.status, exc.reason, quarantine_path)
        log_event(
            log,
            "instance_rejected",
            logging.WARNING,
            status=f"0x{exc.status:04X}",
            calling_ae=calling,
            sop_class=sop_class,
            sop=sop_uid,
            reason=exc.reason,
            quarantine=quarantine_path,
        )
        return _failure(exc.status, exc.reason)
