"""A single-member etcd 3.4 for :class:`~pgfailover.testing.patroni.PatroniCluster`.

Started from flags (not a config file: from a file, etcd 3.4 leaves the gRPC gateway, and
with it the v3 HTTP API Patroni's ``etcd3`` DCS speaks, disabled unless
``enable-grpc-gateway: true``), listening on loopback only, with its data under the cluster's
directory.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from ._osuser import OsUser
from ._process import ServerProcess
from .errors import BinariesNotFound, HarnessError

HOST = "127.0.0.1"


def find_etcd(path: str | os.PathLike[str] | None = None) -> Path:
    """Find the ``etcd`` server program: ``path``, ``$PGFAILOVER_ETCD``, ``PATH``, /usr/bin."""
    explicit = path or os.environ.get("PGFAILOVER_ETCD")
    if explicit:
        if not Path(explicit).is_file():
            raise BinariesNotFound(f"etcd program {explicit} does not exist")
        return Path(explicit)
    found = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").is_file() else None)
    if found is None:
        raise BinariesNotFound(
            "etcd not found: install it (Debian: apt-get install etcd-server, or run "
            "scripts/ensure-system-deps) or set PGFAILOVER_ETCD"
        )
    return Path(found)


class Etcd:
    """One etcd member: ``client_port`` serves clients, ``peer_port`` the (unused) raft peers."""

    def __init__(self, root: Path, client_port: int, peer_port: int) -> None:
        self.root = root
        self.host = HOST
        self.client_port = client_port
        self.peer_port = peer_port
        self.datadir = root / "data"
        self.log_path = root / "etcd.log"
        self.process: ServerProcess | None = None

    @property
    def url(self) -> str:
        """The client endpoint, ``http://127.0.0.1:<port>``."""
        return f"http://{self.host}:{self.client_port}"

    @property
    def running(self) -> bool:
        """Whether the etcd process runs."""
        return self.process is not None and self.process.running

    def argv(self, program: Path) -> list[str]:
        """The command line that starts this member."""
        peer = f"http://{self.host}:{self.peer_port}"
        return [
            str(program),
            "--name=etcd0",
            f"--data-dir={self.datadir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=etcd0={peer}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token=pgfailover-{secrets.token_hex(4)}",
            "--enable-grpc-gateway=true",
            "--heartbeat-interval=100",
            "--election-timeout=1000",
            "--logger=zap",
            "--log-level=warn",
        ]

    def start(self, program: Path, osuser: OsUser, env: Mapping[str, str]) -> ServerProcess:
        """Start etcd as ``osuser`` (it is not waited for: see :meth:`ready`)."""
        self.root.mkdir(mode=0o700, exist_ok=True)
        osuser.own(self.root)
        self.process = ServerProcess(
            osuser.wrap(self.argv(program)),
            log_path=self.log_path,
            cwd=self.root,
            env=env,
            description="etcd",
        )
        return self.process

    def ready(self) -> bool | None:
        """True once the v3 API answers a read; None while it does not yet.

        Raises :class:`HarnessError` (with the log's tail) if etcd has exited.
        """
        if self.process is None or not self.process.running:
            tail = self.process.log_tail() if self.process else ""
            raise HarnessError(f"etcd exited during start-up; log tail:\n{tail}")
        request = urllib.request.Request(  # noqa: S310 - a loopback http URL we built
            f"{self.url}/v3/kv/range",
            data=json.dumps({"key": "AA=="}).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310
            return True if response.status == 200 else None

    def get(self, key: str, timeout: float = 2.0) -> str | None:
        """The value of ``key`` (decoded as UTF-8), None when it does not exist.

        Raises OSError when etcd does not answer within ``timeout`` seconds.
        """
        request = urllib.request.Request(  # noqa: S310 - a loopback http URL we built
            f"{self.url}/v3/kv/range",
            data=json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            body = json.loads(response.read())
        kvs = body.get("kvs") or []
        if not kvs:
            return None
        return base64.b64decode(kvs[0].get("value", "")).decode()
