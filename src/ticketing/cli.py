"""The `ticketing` command."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="ticketing: an event-driven ticket marketplace.", no_args_is_help=True)


@app.command()
def up(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the gateway.")] = 8000,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run the whole platform in one process, starting embedded parts for unset URLs."""
    from ticketing.platform.up import PortBusyError, run_up

    try:
        run_up(host=host, port=port, log_level=log_level)
    except PortBusyError as exc:
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

    from ticketing.common.logs import configure_logging
    from ticketing.platform.services import SERVICES

    spec = SERVICES.get(service)
    if spec is None:
        typer.secho(f"error: unknown service {service!r}; one of {', '.join(SERVICES)}", err=True)
        raise typer.Exit(2)
    try:
        settings = spec.settings()
        settings.require_urls(*spec.needs)
    except ValueError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    configure_logging(json_lines=settings.log_json, level=settings.log_level)
    uvicorn.run(spec.factory()(settings), host=host, port=port, proxy_headers=True, log_config=None)


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
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    config = spec.alembic_config(settings.service_database_url(service))
    if new:
        new_revision(config, new)
    else:
        upgrade(config)
        typer.echo(f"{service}: database at the newest schema")


def main() -> None:
    app()
