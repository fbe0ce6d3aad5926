"""DCMTK peers for end-to-end tests: storescu as a modality, storescp as a PACS that keeps every copy.

storescp runs with ``--unique-filenames`` so an instance received twice leaves two files: the file
count at the peer is the number of C-STORE requests it accepted, which is what "nothing is sent
twice" must be checked against. ``TCP_NODELAY=1`` makes DCMTK turn Nagle's algorithm off.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

ENV = dict(os.environ, TCP_NODELAY="1")


class ReservedPort:
    """A port bound but not listening: connections to it are refused until ``release``.

    Holding the port keeps another process on the machine from taking it while a test wants it
    closed (a peer that is down) and reopens it later for its own listener.
    """

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]

    def release(self) -> int:
        self._sock.close()
        return self.port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StoreSCPPeer:
    """DCMTK storescp writing each received instance to its own file under ``folder``."""

    def __init__(self, storescp: str, folder: Path, ae_title: str = "PEER", port: int | None = None,
                 extra_args: list[str] | None = None):
        self.storescp = storescp
        self.extra_args = list(extra_args or [])
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = port or _free_port()
        self._proc: subprocess.Popen | None = None

    def start(self) -> StoreSCPPeer:
        self._log = open(self.folder.parent / f"storescp-{self.port}.log", "wb")
        self._proc = subprocess.Popen(
            [self.storescp, "--aetitle", self.ae_title, "--output-directory", str(self.folder), "--unique-filenames",
             "--max-pdu", "131072", *self.extra_args, str(self.port)],
            env=ENV, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"storescp exited with {self._proc.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError("storescp did not listen within 15 s")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None
            self._log.close()

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def received_uids(self) -> list[str]:
        """SOP Instance UID of every received copy (a UID twice = received twice)."""
        import pydicom

        return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.files()]

    def __enter__(self) -> StoreSCPPeer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def storescu(tool: str, files: list[Path], *, port: int, calling_ae: str, called_ae: str = "DICOMNODE",
             extra_args: list[str] | None = None) -> None:
    """C-STORE ``files`` to the node on 127.0.0.1 with DCMTK storescu; raises if any store failed."""
    result = subprocess.run(
        [tool, "-aet", calling_ae, "-aec", called_ae, "--max-pdu", "131072", *(extra_args or []), "127.0.0.1",
         str(port), *[str(f) for f in files]],
        env=ENV, capture_output=True, text=True, timeout=120,
    )
    if result.returncode != 0:
        raise AssertionError(f"storescu failed ({result.returncode}): {result.stderr[-2000:]}")
