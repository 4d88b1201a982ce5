"""The `ticketing` command."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="ticketing: an event-driven ticket marketplace.", no_args_is_help=True)


@app.command()
def up(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the gateway (0: any free port).")] = 8000,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Processes serving requests, sharing the port; above 1, events are handled "
            "in two more processes of their own.",
        ),
    ] = 1,
) -> None:
    """Run the whole platform, starting embedded parts for unset URLs."""
    from ticketing.platform.up import ListenError, run_up

    try:
        run_up(host=host, port=port, log_level=log_level, workers=workers)
    except ListenError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="The service to run, e.g. auth.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Run one service the way a container does; every URL it needs must be set."""
    import uvicorn

    from ticketing.common.gc_tuning import tune_for_serving
    from ticketing.common.logs import configure_logging
    from ticketing.platform.gateway import KEEP_ALIVE_SECONDS
    from ticketing.platform.services import SERVICES

    spec = SERVICES.get(service)
    if spec is None:
        typer.secho(f"error: unknown service {service!r}; one of {', '.join(SERVICES)}", err=True)
        raise typer.Exit(2)
    try:
        settings = spec.settings()
        settings.require_urls(*spec.needs)
    except ValueError as exc:
        typer.secho(f"error: {refusal(exc)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    configure_logging(json_lines=settings.log_json, level=settings.log_level)
    if "env" not in settings.model_fields_set:
        # dev is the default for a laptop; a container that forgot to say so would sign
        # sessions with the public development key and send the cookie without Secure.
        logging.getLogger("ticketing").warning(UNSET_ENV_WARNING)
    app = spec.factory()(settings)
    tune_for_serving()
    uvicorn.run(
        app,
        host=host,
        port=port,
        proxy_headers=True,
        log_config=None,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )


UNSET_ENV_WARNING = (
    "TICKETING_ENV is not set: serving as dev (the development JWT key, no Secure cookie, "
    "tables made at start); set TICKETING_ENV=production outside a laptop"
)


def refusal(exc: ValueError) -> str:
    """Why the settings were refused, one line each, without their values: pydantic's own
    message shows what it was given, and a secret is among them."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    reasons = (str(error["msg"]).removeprefix("Value error, ") for error in exc.errors())
    return "; ".join(reasons)


@app.command()
def migrate(
    service: Annotated[str, typer.Argument(help="The service whose database to migrate.")],
    new: Annotated[
        str | None, typer.Option(help="Instead, write a new revision with this message.")
    ] = None,
) -> None:
    """Bring a service's database to the newest schema (TICKETING_DATABASE_URL must be set)."""
    from ticketing.common.migrate import new_revision, upgrade
    from ticketing.platform.services import SERVICES

    spec = SERVICES.get(service)
    if spec is None or not spec.has_database:
        with_db = [name for name, s in SERVICES.items() if s.has_database]
        typer.secho(f"error: no database for {service!r}; one of {', '.join(with_db)}", err=True)
        raise typer.Exit(2)
    try:
        settings = spec.settings()
        settings.require_urls("database_url")
    except ValueError as exc:
        typer.secho(f"error: {refusal(exc)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    config = spec.alembic_config(settings.service_database_url(service))
    if new:
        new_revision(config, new)
    else:
        upgrade(config)
        typer.echo(f"{service}: database at the newest schema")


bench_app = typer.Typer(help="Benchmarks; their code lives in bench/ of a checkout.",
                        no_args_is_help=True)  # fmt: skip
app.add_typer(bench_app, name="bench")


@bench_app.command("flash-sale")
def flash_sale(
    quick: Annotated[bool, typer.Option(help="Every phase, small: a smoke test.")] = False,
    sellers: Annotated[int | None, typer.Option(min=1)] = None,
    tickets: Annotated[int | None, typer.Option(min=1)] = None,
    buyers: Annotated[int | None, typer.Option(min=1, help="Concurrent buyers.")] = None,
    hot: Annotated[
        int | None, typer.Option(min=1, help="Buyers pick among the first HOT tickets listed.")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option(min=1, help="Rush in turns: ceiling, platform, N times.")
    ] = None,
    expiring: Annotated[int | None, typer.Option(min=1, help="Orders left to expire.")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Platform (and ceiling) processes.")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="A running platform instead of a new one.")
    ] = None,
    database_template: Annotated[
        str | None, typer.Option(help="With --url: its TICKETING_DATABASE_URL, for the checks.")
    ] = None,
    subject_prefix: Annotated[
        str | None, typer.Option(help="With --url: its TICKETING_NATS_SUBJECT_PREFIX.")
    ] = None,
    postgres_url: Annotated[str, typer.Option()] = "postgresql://postgres@127.0.0.1:5432",
    nats_url: Annotated[str, typer.Option()] = "nats://127.0.0.1:4222",
    redis_url: Annotated[str, typer.Option()] = "redis://127.0.0.1:6379/0",
    no_ceiling: Annotated[bool, typer.Option(help="Skip the ceiling's rush.")] = False,
    kill_every: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="Kill a platform worker outright every SECONDS of the rush (a crash test).",
        ),
    ] = None,
    drop_connections_every: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="End the platform's every connection to PostgreSQL, NATS and Redis every"
            " SECONDS of the rush and of the expiry.",
        ),
    ] = None,
    out_dir: Annotated[Path, typer.Option(help="Logs and the chart go here.")] = Path(
        "artifacts/bench"
    ),
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the numbers here.")
    ] = None,
    chart: Annotated[
        Path | None, typer.Option(help="The PNG chart (default in --out-dir).")
    ] = None,
) -> None:
    """Thousands of attempts on a few tickets: sell fast, never oversell, compare to a ceiling."""
    try:
        from bench.flash_sale.config import Config
        from bench.flash_sale.run import main as run_bench
    except ImportError as exc:
        typer.secho(
            f"error: the benchmark needs the dev extra: pip install -e '.[dev]' ({exc})", err=True
        )
        raise typer.Exit(2) from exc
    if url and not database_template:
        typer.secho("error: --url needs --database-template for the checks", err=True)
        raise typer.Exit(2)
    if url and (kill_every is not None or drop_connections_every is not None):
        typer.secho(
            "error: --kill-every and --drop-connections-every fault a platform it starts",
            err=True,
        )
        raise typer.Exit(2)
    sizes = {"sellers": sellers, "tickets": tickets, "buyers": buyers, "hot": hot,
             "rounds": rounds, "expiring": expiring, "workers": workers}  # fmt: skip
    given = {key: value for key, value in sizes.items() if value is not None}
    common = dict(
        url=url, database_template=database_template, postgres_url=postgres_url,
        nats_url=nats_url, redis_url=redis_url, ceiling=not no_ceiling, out_dir=out_dir,
        json_path=json_path, chart_path=chart, kill_every=kill_every,
        drop_connections_every=drop_connections_every,
        subject_prefix=subject_prefix or ("ticketing" if url else "benchflash"),
    )  # fmt: skip
    config = Config.quick(**given, **common) if quick else Config(**given, **common)  # type: ignore[arg-type]
    raise typer.Exit(run_bench(config))


def main() -> None:
    app()
