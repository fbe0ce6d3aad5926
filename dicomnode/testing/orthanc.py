"""A throw-away Orthanc PACS on loopback for tests and the demo, with a small REST client.

Orthanc gets a temporary configuration: free DICOM and HTTP ports, storage in a temporary
folder, HTTP reachable from localhost only, any calling AE may store, and one modality
("node") pointing at the node. ``TCP_NODELAY=1`` is set in its environment because its DICOM
layer (DCMTK) leaves Nagle's algorithm on otherwise (about 20 instances/s).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODALITY = "node"


class OrthancError(RuntimeError):
    """Orthanc could not be started or answered a request with an error."""


def find_orthanc() -> str | None:
    """Path of the Orthanc executable (Debian installs it in /usr/sbin), or None."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return "/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class NodePeer:
    """How Orthanc reaches the node (its ``DicomModalities`` entry)."""

    ae_title: str
    host: str
    port: int


class Orthanc:
    """A running Orthanc: ``ae_title``/``dicom_port`` for DICOM, ``url`` for REST."""

    def __init__(self, node: NodePeer, *, ae_title: str = "ORTHANC", workdir: Path | None = None):
        self.node = node
        self.ae_title = ae_title
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="orthanc-"))
        self.dicom_port = _free_port()
        self.http_port = _free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self._proc: subprocess.Popen | None = None

    def config(self) -> dict[str, Any]:
        return {
            "Name": "dicomnode-test-pacs",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomModalities": {MODALITY: [self.node.ae_title, self.node.host, self.node.port]},
            "Plugins": [],
            "StableAge": 2,
            "SaveJobs": False,
            "DicomScuTimeout": 30,
        }

    def start(self, timeout_s: float = 30.0) -> Orthanc:
        exe = find_orthanc()
        if exe is None:
            raise OrthancError("Orthanc is not installed (apt-get install orthanc)")
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        env = dict(os.environ, TCP_NODELAY="1")
        self._log = open(self.workdir / "orthanc.log", "wb")
        self._proc = subprocess.Popen([exe, "--logdir=" + str(self.workdir), str(config_path)], env=env,
                                      stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self._proc.returncode}; see {self.workdir / 'orthanc.log'}")
            try:
                self.get("/system")
                return self
            except (OSError, OrthancError):
                time.sleep(0.2)
        self.stop()
        raise OrthancError(f"Orthanc did not answer on {self.url} within {timeout_s:g} s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- REST ---------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
                 timeout: float = 120.0) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code} {detail}") from exc

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        raw = self._request("POST", path, json.dumps(payload).encode())
        return json.loads(raw) if raw.strip() else None

    def upload(self, files: list[Path]) -> list[str]:
        """Store DICOM files through REST; returns the Orthanc instance ids."""
        ids = []
        for path in files:
            answer = json.loads(self._request("POST", "/instances", Path(path).read_bytes(), "application/dicom"))
            ids.append(answer["ID"])
        return ids

    def route(self, resources: list[str], modality: str = MODALITY) -> Any:
        """C-STORE studies/series/instances (Orthanc ids) to ``modality``, synchronously."""
        return self.post(f"/modalities/{modality}/store", {"Resources": resources, "Synchronous": True})

    def lookup(self, uid: str, kind: str = "Study") -> str | None:
        """The Orthanc id of a DICOM UID (``kind``: Patient/Study/Series/Instance), or None."""
        raw = self._request("POST", "/tools/lookup", uid.encode(), "text/plain")
        return next((hit["ID"] for hit in json.loads(raw) if hit["Type"] == kind), None)

    def study_series(self, study_uid: str) -> list[dict[str, Any]]:
        """The series of a study (Orthanc JSON: ``ID``, ``MainDicomTags``, ``Instances``)."""
        study_id = self.lookup(study_uid, "Study")
        return [] if study_id is None else self.get(f"/studies/{study_id}/series")

    def series_instances(self, series_id: str) -> list[dict[str, Any]]:
        return self.get(f"/series/{series_id}/instances")

    def download(self, instance_id: str) -> bytes:
        """The DICOM file of one instance as Orthanc holds it."""
        return self._request("GET", f"/instances/{instance_id}/file")

    def preview_png(self, instance_id: str) -> bytes:
        """Orthanc's rendered PNG of one instance (proves a viewer can decode it)."""
        return self._request("GET", f"/instances/{instance_id}/preview")

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])
