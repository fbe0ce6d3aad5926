"""C-STORE SCU: send files to a peer on one association (the persisted queue is ``net/send_queue.py``).

``send_files`` reports each stored instance as its response arrives (``on_stored``), which is
what lets the queue resume a series after the instances the peer has acknowledged.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS, code_to_category

from dicomnode.config import Destination, NodeConfig, TLSConfig

log = logging.getLogger(__name__)

_MAX_CONTEXTS = 128
# Files are sent as stored (their own presentation contexts, never transcoded), so pynetdicom
# streams each from its file in PDU-sized pieces instead of decoding and re-encoding it whole:
# a whole-body Parametric Map (0.37 GB at 700 slices) held three times its size while it was sent.
pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True


class SendFailed(Exception):
    """A send did not complete: association refused/failed or an instance got a non-success status."""


class SendInterrupted(SendFailed):
    """The node is stopping: the association was released after the last acknowledged instance."""


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


def _keep_responses_for_the_sender(assoc) -> None:
    """Stop pynetdicom's reactor thread from dropping the C-STORE responses ``send_c_store`` awaits.

    pynetdicom 3.0 (and its main branch) races here: ``send_c_store`` pauses the reactor by
    clearing a checkpoint and polling ``_is_paused``, which is still True from the previous
    pause when the reactor thread has not run since. Under CPU load the reactor then takes the
    response off the DIMSE queue, logs "Received unexpected C-STORE service message" and drops
    it; the send waits out its response timeout, aborts and the instance is sent again although
    the peer stored it. A response the reactor finds is put back on the queue for the sender.
    """
    serve = assoc._serve_request

    def serve_requests_only(msg, context_id):
        if not msg.is_valid_request:
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_requests_only


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
    max_pdu: int = NodeConfig().max_pdu,
    skip_refused: bool = False,
    response_timeout_s: float | None = None,
    on_stored: Callable[[int, str, int], None] | None = None,
    stop: threading.Event | None = None,
) -> SendReport:
    """C-STORE ``files`` to ``dest`` on one association; raises ``SendFailed`` unless all are stored.

    ``skip_refused``: a file whose presentation context the peer rejected, or that it answered
    with a failure status, is listed in ``SendReport.skipped`` and the send goes on.

    Presentation contexts are the files' own (SOP class, transfer syntax) pairs, so files are sent
    as stored, never transcoded. Warning statuses (0xB000/B006/B007, any PS3.7 warning) count as stored.
    ``tls``: CA and client certificate used when ``dest.tls`` is set; ``timeout_s`` bounds connect
    and association negotiation, ``response_timeout_s`` (default ``timeout_s``) each C-STORE
    response. ``on_stored(index, sop_instance_uid, status)`` runs after each stored instance;
    when ``stop`` is set the association is released before the next instance (``SendInterrupted``).
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
    response_s = response_timeout_s or timeout_s
    ae.dimse_timeout = response_s
    ae.network_timeout = max(timeout_s, response_s)  # the idle timer must not undercut a response wait
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
    _keep_responses_for_the_sender(assoc)
    statuses: dict[str, int] = {}
    skipped: list[tuple[Path, str]] = []
    accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
    try:
        for index, (path, sop_class, sop_uid, syntax) in enumerate(entries):
            if stop is not None and stop.is_set():
                assoc.release()
                raise SendInterrupted(f"stopped after {index} of {len(entries)} instances")
            if skip_refused and (sop_class, syntax) not in accepted:
                skipped.append((path, f"the peer accepted no presentation context for {_sop_class_name(sop_class)} in {syntax}"))
                continue
            status_ds = assoc.send_c_store(path)
            status = int(getattr(status_ds, "Status", -1)) if status_ds is not None else -1
            statuses[sop_uid] = status
            if status == -1:
                raise SendFailed(f"no C-STORE response from {dest.ae_title} for {path.name} (timeout or abort)")
            if not stored(status):
                comment = str(getattr(status_ds, "ErrorComment", "") or "")
                refusal = f"{dest.ae_title} answered 0x{status:04X} ({status_meaning(status)}) for {path.name} {comment}".rstrip()
                if not skip_refused:
                    raise SendFailed(refusal)
                skipped.append((path, refusal))
                continue
            if on_stored is not None:
                on_stored(index, sop_uid, status)
        assoc.release()
    except SendInterrupted:
        raise
    except BaseException:
        assoc.abort()
        raise
    return SendReport(dest.name, len(entries) - len(skipped), time.perf_counter() - started, statuses, tuple(skipped))


def stored(status: int) -> bool:
    """The peer stored the instance: a Success or Warning status (PS3.4 B.2.3, PS3.7 C), by pynetdicom's table."""
    return code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING)


def status_meaning(status: int) -> str:
    """A C-STORE status as the standard names it, e.g. "Failure: Refused: Out of Resources"."""
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, (code_to_category(status), ""))
    return f"{category}: {meaning}" if meaning else category


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid
