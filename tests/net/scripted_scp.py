"""A real pynetdicom Storage SCP on 127.0.0.1 whose answer to each C-STORE request a test decides.

``answer(n, sop_instance_uid)`` is called for the n-th request (0-based, over all associations)
and returns a DIMSE status, or ``ABORT`` to abort the association instead of answering. A
request answered with success or a warning status counts as stored: ``stored`` lists the SOP
Instance UIDs in arrival order, so a UID twice means the peer got it twice.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from tests.conftest import free_port

ABORT = -1


class ScriptedSCP:
    def __init__(self, answer: Callable[[int, str], int], ae_title: str = "PEER"):
        self.answer = answer
        self.ae_title = ae_title
        self.port = free_port()
        self.stored: list[str] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._server = None

    def _on_store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            n = self.requests
            self.requests += 1
        status = self.answer(n, uid)
        if status == ABORT:
            event.assoc.abort()  # A-ABORT instead of a response: the instance is not stored
            return 0xA700  # never sent: the association is gone
        if code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING):
            with self._lock:
                self.stored.append(uid)
        return status

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self.stored)

    def __enter__(self) -> ScriptedSCP:
        ae = AE(ae_title=self.ae_title)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
