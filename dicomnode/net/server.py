"""The SCP's listening server: pynetdicom's threaded server, with the TLS handshake per connection.

pynetdicom wraps each accepted socket in its accept loop (``get_request``) with no timeout, so one
client that opens TCP and says nothing blocks every later association. Here the accept loop only
accepts; the handshake runs in the connection's own thread, bounded by a timeout, before the
association starts.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from datetime import datetime

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.log import event as log_event

log = logging.getLogger(__name__)

# (peer host, peer port, reason) of a connection whose TLS handshake failed or timed out.
HandshakeFailed = Callable[[str, int, str], None]


class HandshakeServer(ThreadedAssociationServer):
    """A ThreadedAssociationServer whose TLS handshakes run in the connection threads, with a timeout."""

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        tls_context: ssl.SSLContext | None,
        handshake_timeout_s: float,
        on_handshake_failed: HandshakeFailed | None = None,
        evt_handlers=None,
    ):
        # No ssl_context for the base class: its get_request would handshake in the accept loop.
        super().__init__(ae, address, ae.ae_title, ae.supported_contexts, None, evt_handlers=evt_handlers)
        self.tls_context = tls_context
        self.handshake_timeout_s = handshake_timeout_s
        self.on_handshake_failed = on_handshake_failed

    def process_request_thread(self, request, client_address) -> None:
        if self.tls_context is not None:
            request = self._handshake(request, client_address)
            if request is None:
                return
        super().process_request_thread(request, client_address)

    def _handshake(self, sock: socket.socket, client_address) -> ssl.SSLSocket | None:
        host, port = str(client_address[0]), int(client_address[1])
        try:
            sock.settimeout(self.handshake_timeout_s)
            wrapped = self.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            wrapped.do_handshake()
            wrapped.settimeout(None)  # as pynetdicom expects: blocking, it selects before reading
            return wrapped
        except (OSError, ssl.SSLError) as exc:  # socket.timeout is an OSError
            reason = "TLS handshake timed out" if isinstance(exc, TimeoutError) else f"TLS handshake failed: {exc}"
            log_event(log, "tls_handshake_failed", logging.WARNING, peer=host, port=port, reason=reason[:200])
            try:
                sock.close()
            except OSError:
                pass
            if self.on_handshake_failed is not None:
                self.on_handshake_failed(host, port, reason[:200])
            return None


def start_server(
    ae: AE,
    address: tuple[str, int],
    *,
    tls_context: ssl.SSLContext | None,
    handshake_timeout_s: float,
    on_handshake_failed: HandshakeFailed | None,
    evt_handlers,
) -> HandshakeServer:
    """Listen in a background thread, as ``AE.start_server(block=False)`` does; returns the server."""
    server = HandshakeServer(ae, address, tls_context, handshake_timeout_s, on_handshake_failed, evt_handlers)
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}", daemon=True)
    thread.start()
    ae._servers.append(server)  # AssociationServer.shutdown removes it from there
    return server
