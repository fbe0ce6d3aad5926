"""DICOM over TLS with DCMTK peers: storescu -> node's TLS listener, node -> storescp over TLS.

Certificates come from a throw-away CA made with the openssl command line for each test run; the
server certificates name 127.0.0.1 so host-name verification is exercised, not switched off.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from tests.conftest import free_port, require_tool
from tests.e2e.dcmtk_peers import StoreSCPPeer, storescu
from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Association, Instance
from dicomnode.config import Destination, TLSConfig, load_config
from dicomnode.net.scp import StoreSCP
from dicomnode.net.scu import SendFailed, send_files
from dicomnode.store.spool import Spool
from dicomnode.testing.study import write_synthetic_study

pytestmark = pytest.mark.e2e


def _openssl(tool: str, *args: str | Path) -> None:
    subprocess.run([tool, *map(str, args)], check=True, capture_output=True, timeout=60)


def _issue(tool: str, folder: Path, ca: str, name: str, san: str | None) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    _openssl(tool, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl(tool, "x509", "-req", "-in", csr, "-CA", folder / f"{ca}.pem", "-CAkey", folder / f"{ca}.key",
             "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext)
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """Two CAs: ``ca`` signs the server and client certificates, ``other`` is a CA nobody trusts."""
    tool = require_tool("openssl")
    folder = tmp_path_factory.mktemp("pki")
    out: dict[str, Path] = {}
    for ca in ("ca", "other"):
        _openssl(tool, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", folder / f"{ca}.key",
                 "-out", folder / f"{ca}.pem", "-days", "2", "-subj", f"/CN=dicomnode test {ca}")
        out[ca] = folder / f"{ca}.pem"
    out["server_key"], out["server"] = _issue(tool, folder, "ca", "server", "IP:127.0.0.1")
    out["client_key"], out["client"] = _issue(tool, folder, "ca", "client", None)
    out["rogue_key"], out["rogue"] = _issue(tool, folder, "other", "rogue", "IP:127.0.0.1")
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    return write_synthetic_study(tmp_path_factory.mktemp("study"), modalities=("CT",), shape=(4, 32, 32))["CT"]


def _tls_node(tmp_path: Path, pki: dict[str, Path], require_client_cert: bool, **tls_extra) -> StoreSCP:
    tls = {"enabled": True, "cert_file": str(pki["server"]), "key_file": str(pki["server_key"]),
           "ca_file": str(pki["ca"]), "require_client_cert": require_client_cert, **tls_extra}
    config = load_config(None, {"node": {"port": free_port()}, "tls": tls})
    scp = StoreSCP(config, AuditDB.open(f"sqlite:///{tmp_path / 'audit.db'}"), Spool(tmp_path / "spool"))
    scp.start()
    return scp


def _callers(scp: StoreSCP) -> set[str]:
    """Calling AEs of the associations the node accepted."""
    with scp.db.session() as s:
        return set(s.scalars(select(Association.calling_ae).where(Association.accepted.is_(True))))


def _failed_handshakes(scp: StoreSCP) -> list[str]:
    """Reasons of the connections refused before any association (recorded, not accepted)."""
    with scp.db.session() as s:
        rows = s.scalars(select(Association).where(Association.accepted.is_(False))).all()
    return [r.reason for r in rows if r.reason.startswith("TLS handshake")]


def _tls_alert(port: int, pki: dict[str, Path], client: str) -> str:
    """The TLS error a client presenting ``client``'s certificate gets from the node ("" = none)."""
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    context.load_cert_chain(str(pki[client]), str(pki[f"{client}_key"]))
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.recv(1)  # TLS 1.3: the server's verdict on our certificate arrives after the handshake
        except ssl.SSLError as exc:
            return str(exc)
    return ""


def _stored(scp: StoreSCP) -> int:
    with scp.db.session() as s:
        return s.scalar(select(func.count()).select_from(Instance))


@pytest.mark.parametrize("require_client_cert", [False, True])
def test_storescu_over_tls_to_node(tmp_path, pki, files, require_client_cert):
    tool = require_tool("storescu")
    scp = _tls_node(tmp_path, pki, require_client_cert)
    try:
        tls_args = ["+tls", str(pki["client_key"]), str(pki["client"]), "+cf", str(pki["ca"])]
        storescu(tool, files, port=scp.port, calling_ae="TLSSCU", extra_args=tls_args)
        assert _stored(scp) == len(files)
        # Plain TCP to the TLS port gets no association (no A-ASSOCIATE-AC or -RJ: the node speaks
        # only TLS there), and stores nothing.
        with pytest.raises(AssertionError, match=r"storescu failed.*Association Request Failed.*Peer aborted Association"):
            storescu(tool, files[:1], port=scp.port, calling_ae="PLAIN")
        if require_client_cert:
            # A client certificate from an untrusted CA is refused during the handshake: storescu's
            # connection is dropped before any association, and the TLS alert says why.
            with pytest.raises(AssertionError, match=r"storescu failed.*Association Request Failed.*"
                                                     r"(Peer aborted Association|Connection reset by peer)"):
                storescu(tool, files[:1], port=scp.port, calling_ae="ROGUE",
                         extra_args=["+tls", str(pki["rogue_key"]), str(pki["rogue"]), "+cf", str(pki["ca"])])
            assert "unknown ca" in _tls_alert(scp.port, pki, "rogue").lower()
        assert _callers(scp) == {"TLSSCU"}  # neither refusal became an association
        # ... but each refused connection is audited with the TLS reason.
        # The audit row of a refused handshake is written on the connection's thread, after the
        # client already saw the alert: wait for it rather than read at once.
        wanted = 3 if require_client_cert else 1
        deadline = time.monotonic() + 30
        while len(refused := _failed_handshakes(scp)) < wanted and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(refused) >= wanted, refused
        # The listener survives both refusals.
        storescu(tool, files[:1], port=scp.port, calling_ae="TLSSCU", extra_args=tls_args)
        assert _stored(scp) == len(files)  # the repeat is idempotent
    finally:
        scp.stop()
        scp.db.close()


def test_node_sends_over_tls_and_verifies_the_peer(tmp_path, pki, files):
    tool = require_tool("storescp")
    client_tls = TLSConfig(ca_file=pki["ca"], cert_file=pki["client"], key_file=pki["client_key"])
    server_args = ["+tls", str(pki["server_key"]), str(pki["server"]), "+cf", str(pki["ca"])]
    with StoreSCPPeer(tool, tmp_path / "peer", extra_args=server_args) as peer:
        dest = Destination(name="peer", ae_title=peer.ae_title, host="127.0.0.1", port=peer.port, tls=True)
        report = send_files(dest, files, calling_ae="DICOMNODE", timeout_s=15, tls=client_tls)
        assert report.sent == len(files) and len(peer.files()) == len(files)
    # A peer whose certificate our CA did not sign is not sent to.
    rogue_args = ["+tls", str(pki["rogue_key"]), str(pki["rogue"]), "-ic"]
    with StoreSCPPeer(tool, tmp_path / "rogue", extra_args=rogue_args) as peer:
        dest = Destination(name="rogue", ae_title=peer.ae_title, host="127.0.0.1", port=peer.port, tls=True)
        with pytest.raises(SendFailed, match="association to"):
            send_files(dest, files, calling_ae="DICOMNODE", timeout_s=15, tls=client_tls)
        assert peer.files() == []


def _tls_echo(scp: StoreSCP, pki: dict[str, Path]) -> float:
    """Seconds a mutual-TLS C-ECHO (pynetdicom as the peer) takes, association included."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    context.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 30
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOMNODE", tls_args=(context, "127.0.0.1"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    return time.monotonic() - started


def test_idle_connection_does_not_stall_tls_and_times_out(tmp_path, pki):
    # pynetdicom handshakes in its accept loop without a timeout: one silent TCP client used to
    # block every later association on the TLS port.
    scp = _tls_node(tmp_path, pki, True, handshake_timeout_s=3)
    idle = [socket.create_connection(("127.0.0.1", scp.port)) for _ in range(5)]
    try:
        time.sleep(0.2)  # the node has accepted them and waits for a ClientHello
        assert _tls_echo(scp, pki) < 2.0
        # The silent clients are cut off after the handshake timeout, and audited.
        for sock in idle:
            sock.settimeout(30)
            assert sock.recv(1) == b""

        def refused() -> list[Association]:
            with scp.db.session() as s:
                return s.scalars(select(Association).where(Association.accepted.is_(False))).all()

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if len(refused()) == len(idle):
                break
        rows = refused()
        assert len(rows) == len(idle)
        assert {(r.reason, r.peer_host) for r in rows} == {("TLS handshake timed out", "127.0.0.1")}
        assert _tls_echo(scp, pki) < 2.0
    finally:
        for sock in idle:
            sock.close()
        scp.stop()
        scp.db.close()
