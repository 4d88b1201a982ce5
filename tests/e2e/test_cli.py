"""The `ticketing` command as a person runs it: `up` and `serve` in real child processes."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import Infra
from tests.support import TICKETING, clean_env, eventually, wait_healthy, wait_up
from ticketing.cli import UNSET_ENV_WARNING
from ticketing.common.mailbox import read_mailbox
from ticketing.platform.embedded import SmtpSink, free_port, port_answers
from ticketing.platform.services import SERVICES


async def test_up_serves_auth_on_embedded_defaults(
    launch: Any, tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    env = clean_env(TICKETING_DATA_DIR=str(tmp_path / "data"), TICKETING_SMTP_URL=smtp_sink.url)
    proc = launch("up", "--port", "0", env=env)
    base = await wait_up(proc)
    creds = {"email": "person@test.com", "password": "secret"}
    async with httpx.AsyncClient(base_url=base) as c:
        assert (await c.post("/api/users/signup", json=creds)).status_code == 201
        assert (await c.get("/api/users/currentuser")).json()["currentUser"]["email"] == creds[
            "email"
        ]
        assert (
            await c.post("/api/users/magic-link", json={"email": "m@test.com"})
        ).status_code == 202
        assert (await c.get("/nowhere")).status_code == 404
    mail = await eventually(lambda: _mail(smtp_sink))
    assert f"{base}/api/users/verify-magic-link?token=" in mail[0]["text"]
    link = next(w for w in mail[0]["text"].split() if "verify-magic-link?token=" in w)
    token = link.split("token=", 1)[1]
    async with httpx.AsyncClient() as visitor:
        assert (await visitor.get(link)).status_code == 303
    # The access log shows the visit, never the one-time secret that signs in.
    await eventually(lambda: "verify-magic-link?token=[redacted]" in proc.output())
    out = proc.output()
    assert token not in out
    assert "NATS JetStream" in out and "embedded" in out
    nats_port = _embedded_nats_port(out)
    assert proc.interrupt() == 0
    assert not port_answers("127.0.0.1", nats_port)  # the child nats-server stopped too
    assert (tmp_path / "data" / "auth.db").exists()
    assert (tmp_path / "data" / "nats" / "jetstream").exists()

    # Data persists in the data dir across a restart.
    proc = launch("up", "--port", "0", env=env)
    base = await wait_up(proc)
    async with httpx.AsyncClient(base_url=base) as c:
        assert (await c.post("/api/users/signin", json=creds)).status_code == 200
    assert proc.interrupt() == 0


async def _mail(sink: SmtpSink) -> list[dict[str, Any]]:
    return read_mailbox(sink.folder)


def _embedded_nats_port(output: str) -> int:
    for line in output.splitlines():
        if "NATS JetStream" in line and "nats://" in line:
            return int(line.split("nats://")[1].split(":")[1].split()[0].strip("│ "))
    raise AssertionError(output)


async def test_up_uses_the_parts_named_by_url(
    launch: Any, tmp_path: Path, smtp_sink: SmtpSink, infra: Infra, namespace: str,
    settings_kwargs: dict[str, Any],
) -> None:  # fmt: skip
    env = clean_env(
        TICKETING_DATA_DIR=str(tmp_path / "data"),
        TICKETING_SMTP_URL=smtp_sink.url,
        TICKETING_DATABASE_URL=settings_kwargs["database_url"],
        TICKETING_NATS_URL=infra.nats_url,
        TICKETING_REDIS_URL=infra.redis_url,
        TICKETING_NATS_STREAM=settings_kwargs["nats_stream"],
        TICKETING_NATS_SUBJECT_PREFIX=settings_kwargs["nats_subject_prefix"],
    )
    proc = launch("up", "--port", "0", env=env)
    base = await wait_up(proc)
    async with httpx.AsyncClient(base_url=base) as c:
        response = await c.post(
            "/api/users/signup", json={"email": "u@test.com", "password": "pass"}
        )
        assert response.status_code == 201
    out = proc.output()
    assert infra.nats_url in out and infra.redis_url in out
    assert "external" in out
    # No embedded server was started, and the user is in the database the URL names.
    assert list((tmp_path / "data").iterdir()) == []
    assert await _users(settings_kwargs["database_url"].format(service="auth")) == ["u@test.com"]
    assert proc.interrupt() == 0


async def _users(database_url: str) -> list[str]:
    from sqlalchemy import text

    from ticketing.common.db import Database

    db = Database(database_url)
    try:
        async with db.engine.connect() as connection:
            emails = await connection.scalars(text("SELECT email FROM users"))
            return list(emails)
    finally:
        await db.dispose()


async def test_a_second_up_on_a_busy_port_says_so(launch: Any, tmp_path: Path) -> None:
    proc = launch("up", "--port", "0", env=clean_env(TICKETING_DATA_DIR=str(tmp_path / "a")))
    port = httpx.URL(await wait_up(proc)).port
    second = subprocess.run(
        [*TICKETING, "up", "--port", str(port)],
        env=clean_env(TICKETING_DATA_DIR=str(tmp_path / "b")),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 1
    assert f"port {port}" in second.stderr and "already in use" in second.stderr
    assert proc.interrupt() == 0


def test_serve_requires_its_urls(tmp_path: Path) -> None:
    result = subprocess.run(
        [*TICKETING, "serve", "auth"], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "TICKETING_DATABASE_URL" in result.stderr
    assert "TICKETING_NATS_URL" in result.stderr


def test_serve_refuses_an_unknown_service() -> None:
    result = subprocess.run(
        [*TICKETING, "serve", "nope"], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "unknown service" in result.stderr


def test_serve_refuses_production_without_a_real_jwt_key() -> None:
    env = clean_env(
        TICKETING_ENV="production",
        TICKETING_DATABASE_URL="sqlite+aiosqlite:///x.db",
        TICKETING_NATS_URL="nats://127.0.0.1:4222",
        TICKETING_SMTP_URL="smtp://127.0.0.1:25",
    )
    result = subprocess.run(
        [*TICKETING, "serve", "auth"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "TICKETING_JWT_KEY" in result.stderr


def test_serve_refuses_productions_stand_in_stripe_secrets_without_showing_them() -> None:
    """Refused in one line that names the setting; pydantic's own message would have printed
    the settings it was given, the webhook secret among them."""
    secret = "whsec_" + "s3cr3t" * 6
    env = clean_env(
        TICKETING_ENV="production",
        TICKETING_JWT_KEY="k" * 40,
        TICKETING_DATABASE_URL="sqlite+aiosqlite:///x.db",
        TICKETING_NATS_URL="nats://127.0.0.1:4222",
        TICKETING_STRIPE_SECRET_KEY="sk_test_sandbox",  # what `ticketing up` gives its sandbox
        TICKETING_STRIPE_WEBHOOK_SECRET=secret,
    )
    result = subprocess.run(
        [*TICKETING, "serve", "payments"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "TICKETING_STRIPE_SECRET_KEY must be the account's secret key" in result.stderr
    assert "s3cr3t" not in result.stderr and "input_value" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_serve_runs_one_service_like_a_container(
    launch: Any, smtp_sink: SmtpSink, infra: Infra, settings_kwargs: dict[str, Any]
) -> None:
    port = free_port()
    env = clean_env(
        TICKETING_DATABASE_URL=settings_kwargs["database_url"],
        TICKETING_NATS_URL=infra.nats_url,
        TICKETING_SMTP_URL=smtp_sink.url,
        TICKETING_NATS_STREAM=settings_kwargs["nats_stream"],
        TICKETING_NATS_SUBJECT_PREFIX=settings_kwargs["nats_subject_prefix"],
        TICKETING_LOG_JSON="true",
    )
    proc = launch("serve", "auth", "--host", "127.0.0.1", "--port", str(port), env=env)
    base = f"http://127.0.0.1:{port}"
    await wait_healthy(base, proc)
    async with httpx.AsyncClient(base_url=base) as c:
        assert (await c.get("/readyz")).status_code == 200
        response = await c.post(
            "/api/users/signup", json={"email": "c@test.com", "password": "pass"}
        )
        assert response.status_code == 201
    assert proc.interrupt() == 0
    assert '"level": "info"' in proc.output()  # structured logs
    assert UNSET_ENV_WARNING in proc.output()  # a container that did not say what it is


@pytest.mark.parametrize(("service", "probe", "status"), [
    ("tickets", "/api/tickets", 200),
    ("orders", "/api/orders", 401),
])  # fmt: skip
async def test_serve_runs_tickets_and_orders(
    launch: Any, infra: Infra, settings_kwargs: dict[str, Any], service: str, probe: str,
    status: int,
) -> None:  # fmt: skip
    port = free_port()
    env = clean_env(
        TICKETING_ENV="dev",
        TICKETING_DATABASE_URL=settings_kwargs["database_url"],
        TICKETING_NATS_URL=infra.nats_url,
        TICKETING_NATS_STREAM=settings_kwargs["nats_stream"],
        TICKETING_NATS_SUBJECT_PREFIX=settings_kwargs["nats_subject_prefix"],
    )
    proc = launch("serve", service, "--host", "127.0.0.1", "--port", str(port), env=env)
    base = f"http://127.0.0.1:{port}"
    await wait_healthy(base, proc)
    async with httpx.AsyncClient(base_url=base) as c:
        assert (await c.get("/readyz")).status_code == 200
        assert (await c.get(probe)).status_code == status
    assert proc.interrupt() == 0
    assert "TICKETING_ENV is not set" not in proc.output()  # it was: dev, on purpose


@pytest.mark.parametrize("workers", [1, 2])
async def test_up_runs_the_reservation_flow_by_hand(
    launch: Any, tmp_path: Path, smtp_sink: SmtpSink, workers: int
) -> None:
    """The README's curl walk-through, as HTTP calls against a real `ticketing up`, served by
    one process or by several sharing the port."""
    env = clean_env(TICKETING_DATA_DIR=str(tmp_path / "data"), TICKETING_SMTP_URL=smtp_sink.url)
    proc = launch("up", "--port", "0", "--workers", str(workers), env=env)
    base = await wait_up(proc)
    children = psutil.Process(proc.process.pid).children(recursive=True)
    async with _seller_and_buyer(base) as (seller, buyer):
        ticket = (await seller.post("/api/tickets", json={"title": "Gig", "price": 15})).json()
        order = await eventually(lambda: _placed(buyer, ticket["id"]))

        async def ticket_at(version: int) -> dict[str, Any] | None:
            shown = (await seller.get(f"/api/tickets/{ticket['id']}")).json()
            return shown if shown["version"] == version else None

        assert (await eventually(lambda: ticket_at(1)))["orderId"] == order["id"]
        assert (await buyer.get("/api/orders")).json()[0]["status"] == "created"
        assert (await buyer.delete(f"/api/orders/{order['id']}")).status_code == 204
        assert (await eventually(lambda: ticket_at(2)))["orderId"] is None
        listed = (await buyer.get("/api/tickets")).json()
        assert [t["id"] for t in listed] == [ticket["id"]]
        # HEAD, as HTTP asks of a server: the GET's status and headers, no body (a stray one
        # would break the next GET on the same keep-alive connection).
        for path in ("/api/tickets", f"/api/tickets/{ticket['id']}", "/"):
            got, head = await buyer.get(path), await buyer.head(path)
            assert (head.status_code, head.content) == (200, b""), path
            assert head.headers["content-type"] == got.headers["content-type"], path
        # Whichever worker answers, the root speaks for every service it serves.
        ready = await buyer.get("/readyz")
        assert (ready.status_code, set(ready.json()["services"])) == (200, set(SERVICES))
        assert 'service="orders"' in (await buyer.get("/metrics")).text
    assert proc.interrupt() == 0
    # Every worker and embedded server stopped with the supervisor (multiprocessing's resource
    # tracker a moment after: it ends when it reads the supervisor's end of its pipe close).
    await eventually(lambda: not _running(children), within=5)


async def test_up_with_workers_is_announced_once_every_worker_serves(
    launch: Any, tmp_path: Path
) -> None:
    """The address is announced once every worker has started its services, as the status
    table printed with it shows, not as soon as the processes exist."""
    env = clean_env(TICKETING_DATA_DIR=str(tmp_path / "data"), COLUMNS="200")
    proc = launch("up", "--port", "0", "--workers", "2", env=env)
    await wait_up(proc)
    board = proc.output().split("The platform is at")[0]
    workers = [row for row in board.splitlines() if row.startswith("│") and " worker " in row]
    assert len(workers) == 4, board  # two events workers and two request workers
    assert all("running (pid" in row for row in workers), board
    assert proc.interrupt() == 0


@pytest.mark.parametrize("workers", [1, 2])
async def test_ctrl_c_stops_the_services_before_the_servers_they_use(
    launch: Any, tmp_path: Path, workers: int
) -> None:
    """A terminal's Ctrl-C signals every process of its group at once. The embedded servers
    are not in it: `ticketing up` stops them once its services have stopped, so no listener
    loses its NATS connection (or anything else) on the way out."""
    env = clean_env(TICKETING_DATA_DIR=str(tmp_path / "data"))
    proc = launch("up", "--port", "0", "--workers", str(workers), env=env)
    await wait_up(proc)
    assert proc.ctrl_c() == 0
    assert "Traceback" not in proc.output()
    assert "ERROR" not in proc.output()


def _running(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # gone between the two questions
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


async def test_up_runs_the_whole_lifecycle_on_embedded_defaults(
    launch: Any, tmp_path: Path
) -> None:
    """Sign up, sell, buy, pay with tok_visa, see the order complete; another one expires."""
    # Long enough to pay on a loaded machine, short enough to watch the other order expire.
    env = clean_env(TICKETING_DATA_DIR=str(tmp_path / "data"), TICKETING_ORDER_TTL_SECONDS="6")
    proc = launch("up", "--port", "0", env=env)
    base = await wait_up(proc)
    async with _seller_and_buyer(base) as (seller, buyer):
        paid_ticket = (await seller.post("/api/tickets", json={"title": "A", "price": 10})).json()
        idle_ticket = (await seller.post("/api/tickets", json={"title": "B", "price": 12})).json()

        paid = await eventually(lambda: _placed(buyer, paid_ticket["id"]))
        idle = await eventually(lambda: _placed(buyer, idle_ticket["id"]))

        async def payment() -> httpx.Response | None:
            body = {"orderId": paid["id"], "token": "tok_visa"}
            response = await buyer.post("/api/payments", json=body)
            return None if response.status_code == 404 else response

        assert (await eventually(payment)).status_code == 201

        async def status(order_id: str, wanted: str) -> bool:
            shown = (await buyer.get(f"/api/orders/{order_id}")).json()
            return bool(shown["status"] == wanted)

        await eventually(lambda: status(paid["id"], "complete"))
        await eventually(lambda: status(idle["id"], "cancelled"), within=20)
        assert await status(paid["id"], "complete")

        async def on_sale() -> list[str]:
            return [t["id"] for t in (await buyer.get("/api/tickets")).json()]

        await eventually(lambda: _contains(on_sale, idle_ticket["id"]))
        assert paid_ticket["id"] not in await on_sale()
    out = proc.output()
    assert "Stripe sandbox" in out and "embedded valkey" in out
    assert proc.interrupt() == 0


async def test_up_starts_an_embedded_server_that_died_again(launch: Any, tmp_path: Path) -> None:
    """NATS and Redis killed outright under a running `ticketing up` come back on their ports
    and files: an order placed before keeps its expiry job, a ticket sold after is reserved."""
    env = clean_env(TICKETING_DATA_DIR=str(tmp_path / "data"), TICKETING_ORDER_TTL_SECONDS="8")
    proc = launch("up", "--port", "0", env=env)
    base = await wait_up(proc)
    async with _seller_and_buyer(base) as (seller, buyer):

        async def order_for(title: str) -> dict[str, Any]:
            ticket = (await seller.post("/api/tickets", json={"title": title, "price": 9})).json()
            return await eventually(lambda: _placed(buyer, ticket["id"]), within=30)

        before = await order_for("Before")
        killed = _embedded_servers(proc)
        assert sorted(killed) == ["nats-server", "valkey-server"], killed
        for server in killed.values():
            server.kill()
        # Both again, each a new process (a killed one is still listed until it has died).
        await eventually(lambda: _replaced(_embedded_servers(proc), killed), within=15)

        after = await order_for("After")

        async def status(order_id: str) -> str:
            return str((await buyer.get(f"/api/orders/{order_id}")).json()["status"])

        await eventually(lambda: _is("cancelled", status(before["id"])), within=40)
        await eventually(lambda: _is("cancelled", status(after["id"])), within=40)
    assert "valkey-server on port" in proc.output() and "starting it again" in proc.output()
    assert proc.interrupt() == 0


def _replaced(now: dict[str, psutil.Process], killed: dict[str, psutil.Process]) -> bool:
    return now.keys() == killed.keys() and all(p.pid != killed[n].pid for n, p in now.items())


def _embedded_servers(proc: Any) -> dict[str, psutil.Process]:
    children = psutil.Process(proc.process.pid).children()
    return {p.name(): p for p in _running(children) if p.name() in ("nats-server", "valkey-server")}


async def _is(wanted: str, shown: Any) -> bool:
    return bool(await shown == wanted)


@contextlib.asynccontextmanager
async def _seller_and_buyer(base: str) -> AsyncIterator[tuple[httpx.AsyncClient, ...]]:
    """Two visitors of the platform at `base`, each signed up."""
    async with (
        httpx.AsyncClient(base_url=base) as seller,
        httpx.AsyncClient(base_url=base) as buyer,
    ):
        for visitor, email in ((seller, "s@test.com"), (buyer, "b@test.com")):
            await visitor.post("/api/users/signup", json={"email": email, "password": "secret"})
        yield seller, buyer


async def _placed(buyer: httpx.AsyncClient, ticket_id: str) -> dict[str, Any] | None:
    """The buyer's order for the ticket, or None while the orders service does not know it."""
    response = await buyer.post("/api/orders", json={"ticketId": ticket_id})
    return dict(response.json()) if response.status_code == 201 else None


async def _contains(listing: Any, item: str) -> bool:
    return item in await listing()


def test_migrate_brings_a_service_database_to_head(settings_kwargs: dict[str, Any]) -> None:
    env = clean_env(TICKETING_DATABASE_URL=settings_kwargs["database_url"])
    result = subprocess.run(
        [*TICKETING, "migrate", "orders"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "orders: database at the newest schema" in result.stdout
    refused = subprocess.run(
        [*TICKETING, "migrate", "web"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2
    assert "no database for 'web'" in refused.stderr


async def test_up_behind_a_public_address_and_stopped_by_sigterm(
    launch: Any, tmp_path: Path
) -> None:
    env = clean_env(
        TICKETING_DATA_DIR=str(tmp_path / "data"),
        TICKETING_PUBLIC_URL="https://tickets.example.invalid",
    )
    proc = launch("up", "--port", "0", env=env)
    base = await wait_up(proc)
    async with httpx.AsyncClient(base_url=base) as browser:
        # The pages reach the APIs through this process, not through the public address.
        assert (await browser.get("/")).status_code == 200
        assert (await browser.get("/tickets/%2E%2E")).status_code == 404
        assert (await browser.get("/tickets/not-an-id")).status_code == 404
    nats_port = _embedded_nats_port(proc.output())
    proc.process.terminate()
    assert proc.process.wait(timeout=30) == 0
    assert not port_answers("127.0.0.1", nats_port)  # SIGTERM stops the children too


@pytest.mark.parametrize("workers", [1, 2])
async def test_up_killed_outright_leaves_nothing_running(
    launch: Any, tmp_path: Path, workers: int
) -> None:
    """SIGKILL (or the OOM killer) gives the supervisor no chance to stop its children: they
    stop themselves, so nothing serves on, orphaned, holding the port a restart needs."""
    env = clean_env(TICKETING_DATA_DIR=str(tmp_path / "data"))
    proc = launch("up", "--port", "0", "--workers", str(workers), env=env)
    port = httpx.URL(await wait_up(proc)).port
    children = psutil.Process(proc.process.pid).children(recursive=True)
    assert len(children) >= 2  # the embedded nats-server and valkey, and any workers
    proc.process.kill()
    proc.process.wait()
    await eventually(lambda: not _running(children), within=30)
    again = launch("up", "--port", str(port), env=env)  # the same port and data dir
    await wait_healthy(f"http://127.0.0.1:{port}", again)
    assert again.interrupt() == 0
