"""A real single-node Apache Kafka (KRaft) broker run with ``java``, for ``make up`` and the tests.

The jars come from Maven Central through ``deploy/kafka/pom.xml`` and are cached outside the
repository; the broker's data directory lives under the stack's home so a restart keeps topics and
offsets.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import socket
import string
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

_DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kafka"


def fetch_kafka_jars(cache_dir: Path, version: str) -> Path:
    """Copy Kafka and its dependencies from Maven into ``cache_dir`` once; return the lib folder."""
    lib = cache_dir / f"kafka-{version}" / "lib"
    marker = lib / ".complete"
    if marker.exists():
        return lib
    lib.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "mvn", "-q", "-B", "-f", str(_DEPLOY / "pom.xml"), "dependency:copy-dependencies",
            f"-Dkafka.version={version}", f"-DoutputDirectory={lib}", "-DincludeScope=runtime",
        ],
        check=True,
        timeout=900,
    )
    marker.touch()
    return lib


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class LocalKafka:
    """One broker+controller process with state in ``home``."""

    home: Path
    port: int
    controller_port: int
    lib: Path
    heap: str = "1g"
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def _pidfile(self) -> Path:
        return self.home / "kafka.pid"

    def _java(self, main: str, *args: str, gc_log: Path | None = None) -> list[str]:
        # GC pauses of the broker hold every record in flight; the log shows them. (Kafka's start
        # script sets a 20 ms G1 pause goal and a fixed heap: tried here, A/B with four runs
        # each, no better ledger latency on this 2-core machine, so the JVM defaults stay. ZGC,
        # whose pauses stay under a millisecond, did no better either: three warm runs gave a
        # ledger p99 at 2,000/s of 75 to 138 ms, as G1; its concurrent threads take the CPU the
        # pauses gave back.)
        logging = [f"-Xlog:gc:file={gc_log}:time,uptime:filecount=2,filesize=10m"] if gc_log else []
        return [
            "java", f"-Xmx{self.heap}", "-Xms256m", "-XX:+UseG1GC", *logging,
            f"-Dlog4j2.configurationFile={_DEPLOY / 'log4j2.yaml'}",
            "-cp", f"{self.lib}/*", main, *args,
        ]

    def _write_config(self) -> Path:
        template = string.Template((_DEPLOY / "server.properties").read_text())
        config = self.home / "server.properties"
        config.write_text(
            template.substitute(
                port=self.port, controller_port=self.controller_port,
                data_dir=self.home / "data",
            )
        )
        return config

    def _format_storage(self, config: Path) -> None:
        if (self.home / "data" / "meta.properties").exists():
            return
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # "--cluster-id=ID", not "-t ID": one id in 64 starts with "-", which the tool's
        # argument parser takes for an option, and the broker never starts (seen in a test run).
        subprocess.run(
            self._java("kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                       "--config", str(config)),
            check=True, capture_output=True, timeout=120,
        )

    def running_pid(self) -> int | None:
        try:
            pid = int(self._pidfile.read_text())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None
        return pid

    def start(self, timeout_s: float = 90.0) -> None:
        """Start the broker unless it already runs, and wait until it answers metadata requests."""
        self.home.mkdir(parents=True, exist_ok=True)
        if self.running_pid() is None:
            if _port_open(self.port):
                raise RuntimeError(
                    f"port {self.port} is taken by another process; set HARBOUR_KAFKA_PORT"
                )
            config = self._write_config()
            self._format_storage(config)
            log = (self.home / "kafka.log").open("ab")
            self._proc = subprocess.Popen(
                self._java("kafka.Kafka", str(config), gc_log=self.home / "gc.log"),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            self._pidfile.write_text(str(self._proc.pid))
        wait_for_kafka(self.bootstrap, timeout_s, log=self.home / "kafka.log")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM and wait: Kafka's controlled shutdown flushes its logs."""
        pid = self.running_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                break
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
        self._pidfile.unlink(missing_ok=True)


def wait_for_kafka(bootstrap: str, timeout_s: float = 90.0, log: Path | None = None) -> None:
    """Block until the broker answers a metadata request (not merely accepts TCP)."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    async def probe() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        await admin.start()
        try:
            await admin.describe_cluster()
        finally:
            await admin.close()

    # While the broker boots, every probe fails; aiokafka would log each refused connection.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            asyncio.run(probe())
            return
        except Exception as exc:  # the broker is still starting: any error means "not yet"
            last = exc
            time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"Kafka at {bootstrap} did not answer within {timeout_s}s: {last}\n{tail}")
