"""The ``gateway`` command line (PROTOCOL section 12)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import replace

from adapters.jwt import JwtIssuer
from domain.fixtures import FixtureError
from entrypoints import client_cli, logs
from entrypoints.bootstrap import make_verifier, open_directory
from entrypoints.config import Config, ConfigError, load_fixture_file


def _config(args: argparse.Namespace) -> Config:
    config = Config.from_env()
    if getattr(args, "host", None):
        config = replace(config, host=args.host)
    if getattr(args, "port", None) is not None:
        config = replace(config, port=args.port)
    if getattr(args, "workers", None) is not None:
        config = replace(config, workers=args.workers)
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args)
    logs.configure(fmt=config.log_format)
    make_verifier(config)  # refuse to start without a secret, or with an unusable key
    if config.workers > 1:
        from entrypoints.workers import run_workers

        return run_workers(config)
    from entrypoints.serve import run

    host = config.host if ":" not in config.host else f"[{config.host}]"
    print(
        f"gateway: serving ws://{host}:{config.port}/ws/gateway "
        f"(redis={'yes' if config.redis_url else 'memory'}, "
        f"directory={'postgres' if config.database_url else 'memory'})",
        file=sys.stderr,
    )
    run(config, bind=args.bind)
    return 0


async def _resolve_user(config: Config, who: str) -> str | None:
    async with open_directory(config) as directory:
        user = await directory.find_user(who)
        return user.id if user is not None else None


def cmd_token(args: argparse.Namespace) -> int:
    config = _config(args)
    secret = config.effective_jwt_secret()
    if secret is None:
        print("gateway token: set GATEWAY_JWT_SECRET (HS256) to mint tokens", file=sys.stderr)
        return 2
    user_id = asyncio.run(_resolve_user(config, args.user))
    if user_id is None:
        print(f"gateway token: no user with id or username {args.user!r}", file=sys.stderr)
        return 1
    algorithm = next((a for a in config.jwt_algorithms if a.startswith("HS")), "HS256")
    print(JwtIssuer(key=secret, algorithm=algorithm).issue(user_id, now=time.time(), ttl=args.ttl))
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    config = _config(args)
    if not config.database_url:
        print("gateway db: set GATEWAY_DATABASE_URL", file=sys.stderr)
        return 2
    from adapters.postgres import PostgresDirectory, migrate

    async def main() -> int:
        assert config.database_url is not None
        if args.db_command == "migrate":
            applied = await migrate(config.database_url)
            print(f"applied migrations: {applied or 'none (up to date)'}")
            return 0
        try:
            data = load_fixture_file(args.file)
        except (OSError, json.JSONDecodeError, FixtureError) as exc:
            print(f"gateway db load: {exc}", file=sys.stderr)
            return 1
        async with PostgresDirectory(config.database_url) as directory:
            await directory.load(data)
        print(
            f"loaded {len(data.users)} users, {len(data.servers)} servers, "
            f"{len(data.channels)} channels from {args.file}"
        )
        return 0

    return asyncio.run(main())


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulation.cli import main as simulate_main

    return simulate_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Real-time chat gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the WebSocket gateway")
    serve.add_argument("--host", help="bind address (GATEWAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (GATEWAY_PORT, default 8000)")
    serve.add_argument("--workers", type=int, help="instances on one port (GATEWAY_WORKERS)")
    serve.add_argument("--bind", help=argparse.SUPPRESS)  # fd://N, used by --workers
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="print a JWT for a user id or username")
    token.add_argument("user")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    token.set_defaults(func=cmd_token)

    db = sub.add_parser("db", help="Postgres schema and data")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("migrate", help="apply pending migrations")
    load = db_sub.add_parser("load", help="load a fixture file (PROTOCOL section 11)")
    load.add_argument("file")
    db.set_defaults(func=cmd_db)

    client_cli.add_commands(sub, _config)  # connect, publish

    simulate = sub.add_parser("simulate", help="run the multi-instance simulation", add_help=False)
    simulate.add_argument("rest", nargs=argparse.REMAINDER)
    simulate.set_defaults(func=cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:  # its options are the simulation's own
        from simulation.cli import main as simulate_main

        return simulate_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
