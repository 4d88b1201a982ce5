"""`python -m bench.ceiling`: serve the ceiling app with uvicorn, configured by environment."""

from __future__ import annotations

import argparse

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    uvicorn.run(
        "bench.ceiling.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        access_log=False,
        # As the platform's servers (ticketing.platform.gateway.KEEP_ALIVE_SECONDS): longer
        # than the load generator keeps an idle connection, so no request meets its close.
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    main()
