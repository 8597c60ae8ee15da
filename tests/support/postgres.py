"""A real, throw-away PostgreSQL server for tests: ``initdb`` and ``pg_ctl`` from Debian's
``postgresql`` package (``/usr/lib/postgresql/<version>/bin``, not on PATH), a cluster in a
temporary folder, trust authentication, listening on a free port of 127.0.0.1 only.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user in a
folder it owns. Without the binaries the tests skip, except under CI (``CI`` set), where they
fail: there the server is part of what is tested.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fraudstream.broker import free_port

__all__ = ["create_database", "postgres_bindir", "postgres_server"]

ROLE = "fraudstream"
DATABASE = "fraud"
RUN_AS = "postgres"
TIMEOUT = 120


def postgres_bindir() -> Path | None:
    """The newest installed server's bin folder, or None."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")
             if (p.parent / "initdb").exists()]
    if not found:
        return None
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def _unavailable(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI")
    pytest.skip(f"{what} is not available")


def _run(command: list[str], *, as_user: str | None, log: Path | None = None) -> None:
    """Run a server tool; on failure raise with its output (and the server log)."""
    prefix = ["runuser", "-u", as_user, "--"] if as_user else []
    # A folder every user can enter: the server's tools refuse a working directory they
    # cannot read (root's, a private pytest folder).
    result = subprocess.run([*prefix, *command], capture_output=True, text=True,
                            timeout=TIMEOUT, check=False, cwd=tempfile.gettempdir())
    if result.returncode != 0:
        server_log = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): "
                           f"{result.stdout}{result.stderr}{server_log}")


@contextlib.contextmanager
def postgres_server(tmp_path: Path) -> Iterator[str]:
    """Start a server, yield the SQLAlchemy URL of its empty database ``fraud`` (role
    ``fraudstream``, no password), stop it and remove its files afterwards."""
    bindir = postgres_bindir()
    if bindir is None:
        _unavailable("PostgreSQL (initdb and pg_ctl under /usr/lib/postgresql/*/bin)")
    assert bindir is not None
    as_user: str | None = None
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(RUN_AS)
        except KeyError:
            _unavailable(f"a {RUN_AS!r} user to run PostgreSQL as (it refuses to run as root)")
        if shutil.which("runuser") is None:
            _unavailable("runuser (to run PostgreSQL as the postgres user)")
        as_user = RUN_AS
        # pytest's own temporary folders are private to root: the server gets one it owns.
        base = Path(tempfile.mkdtemp(prefix="fraudstream-pg-"))
        os.chown(base, account.pw_uid, account.pw_gid)
    else:
        base = tmp_path / "postgres"
        base.mkdir(parents=True, exist_ok=True)
    data, sockets, log = base / "data", base / "sockets", base / "server.log"
    port = free_port()
    started = False
    try:
        _run([str(bindir / "initdb"), "-D", str(data), "-U", ROLE, "--auth=trust",
              "--encoding=UTF8", "--locale=C", "--no-sync"], as_user=as_user)
        _run(["mkdir", "-p", str(sockets)], as_user=as_user)
        with (data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(f"\nport = {port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{sockets}'\n"
                       # A test cluster: speed over crash safety.
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
              "start"], as_user=as_user, log=log)
        started = True
        url = f"postgresql+psycopg://{ROLE}@127.0.0.1:{port}/postgres"
        yield create_database(url, DATABASE)
    finally:
        if started:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                      "stop"], as_user=as_user, log=log)
        shutil.rmtree(base, ignore_errors=True)


def create_database(server_url: str, name: str | None = None) -> str:
    """Create an empty database on the server of ``server_url`` (with ``createdb``); returns
    its URL. One per test keeps tests on a shared server independent."""
    from sqlalchemy.engine import make_url

    bindir = postgres_bindir()
    assert bindir is not None, "create_database needs a running postgres_server"
    url = make_url(server_url)
    name = name or f"t_{uuid.uuid4().hex[:12]}"
    _run([str(bindir / "createdb"), "-h", str(url.host), "-p", str(url.port),
          "-U", str(url.username), name], as_user=None)
    return url.set(database=name).render_as_string(hide_password=False)
