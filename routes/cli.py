"""The `fltraining` command: serve, createuser."""

import argparse
import asyncio
import getpass
import sys

from pydantic import ValidationError

from fltraining.schemas.users import UserCreate
from fltraining.services.factory import build_services
from fltraining.settings import Settings
from fltraining.storage.database import database_name, init_database, make_client
from fltraining.storage.embedded import EmbeddedStore, running_store
from routes.server import serve


def _read_password() -> str:
    """The password from stdin: prompted twice on a terminal, else the first line."""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Password (again): "):
            raise SystemExit("passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


async def _create_user(url: str, settings: Settings, data: UserCreate) -> str:
    """Register a user in the store at `url`; return its token."""
    client = make_client(url)
    try:
        database = client[database_name(url, settings.database)]
        await init_database(database)
        _, token = await build_services(database, settings).users.register(data)
        return token
    finally:
        await client.close()


def create_user(settings: Settings, args: argparse.Namespace) -> None:
    """`fltraining createuser USERNAME`: read the password from stdin, print the token."""
    try:
        data = UserCreate(
            username=args.username, password=_read_password(), email=args.email,
            first_name=args.first_name, last_name=args.last_name,
            actor=args.actor, client=args.client, message_endpoint=args.message_endpoint,
        )
    except ValidationError as error:
        raise SystemExit("invalid user: " + "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in error.errors()))
    store: EmbeddedStore | None = None
    # The store of *this* data directory: the running service's (its record says where), else one
    # started here on any free port — never whatever answers on the default port.
    url = settings.mongodb_url or running_store(settings.data_dir)
    if url is None:
        store = EmbeddedStore(settings.data_dir, settings.embedded_host, 0)
        url = store.start()
    try:
        token = asyncio.run(_create_user(url, settings, data))
    except Exception as error:  # a taken username, an unreachable store: one line, no trace
        raise SystemExit(f"could not create user: {getattr(error, 'detail', error)}") from None
    finally:
        if store is not None:
            store.stop()
    print(token)


def parser() -> argparse.ArgumentParser:
    """The command line."""
    root = argparse.ArgumentParser(prog="fltraining", description="Federated learning training management service")
    commands = root.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the HTTP service")
    run.add_argument("--host", help="listen address (FLTRAINING_HOST)")
    run.add_argument("--port", type=int, help="listen port (FLTRAINING_PORT)")
    run.add_argument("--workers", type=int, default=1, help="service processes sharing the port")
    user = commands.add_parser("createuser", help="create a user; password on stdin, token printed")
    user.add_argument("username")
    user.add_argument("--email", default="")
    user.add_argument("--first-name", default="", help="shown in DLR's web frontend (app bar, participant picker)")
    user.add_argument("--last-name", default="")
    user.add_argument("--actor", action="store_true")
    user.add_argument("--client", action="store_true")
    user.add_argument("--message-endpoint", default=None)
    return root


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    args = parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:  # one line per bad variable, no traceback
        problems = "; ".join(f"FLTRAINING_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in error.errors())
        raise SystemExit(f"invalid setting: {problems}") from None
    if args.command == "serve":
        overrides = {key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None}
        if args.workers < 1:
            raise SystemExit("--workers must be at least 1")
        serve(settings.model_copy(update=overrides), args.workers)
    elif args.command == "createuser":
        create_user(settings, args)


if __name__ == "__main__":
    main()
