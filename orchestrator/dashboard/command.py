"""``orch dashboard``: serve the dashboard (uvicorn); registered on the root group of :mod:`orchestrator.cli`.

The web libraries are imported only when the command runs, so ``orch`` works without
the ``dashboard`` extra and says how to get it when it is missing.
"""
from __future__ import annotations

import getpass
import os
import socket
import sys
from pathlib import Path
from typing import Optional

import click

from orchestrator.cli import CliError, CliOptions, handle_errors, main, pass_options, redis_url_option
from orchestrator.cli_cluster import apply_allowlist as allow_only
from orchestrator.dashboard.security import allowed_hosts, check_bind, hash_password, load_users
from shared.connection import connect, redacted

SECRET_ENV = "ORCH_DASHBOARD_SECRET"
"""Key that signs the session cookies (default: a random one per start, which logs everyone out)."""


def _check_port(host: str, port: int) -> None:
    """One clear error line for an address this machine cannot listen on (rather than uvicorn's log)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CliError(f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}; "
                           f"pick a free --port (or a --host of this machine)") from None


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; any but a loopback one needs a login (or --insecure-no-auth).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--auth-file", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="USER:HASH lines (make a line with --hash-password); else ORCH_DASHBOARD_USER and "
                   "ORCH_DASHBOARD_PASSWORD turn on the login.")
@click.option("--insecure-no-auth", is_flag=True, help="Serve a non-loopback address without a login.")
@click.option("--path", "paths", multiple=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Put DIR first on sys.path so that 'Trigger' can load schedules' targets (repeatable).")
@click.option("--allow", "allow", multiple=True, metavar="PREFIX",
              help="Load schedule targets only from these modules when triggering (repeatable; also ORCH_ALLOW).")
@click.option("--allowed-host", "allowed_host", multiple=True, metavar="NAME",
              help="Without a login, also answer to this Host name (repeatable; loopback names always work).")
@click.option("--hash-password", "hash_for", default=None, metavar="USER",
              help="Print an auth-file line for USER (the password read from the terminal or stdin) and exit.")
@redis_url_option
@pass_options
@handle_errors
def dashboard(options: CliOptions, host: str, port: int, auth_file: Optional[Path], insecure_no_auth: bool,
              paths: tuple[str, ...], allow: tuple[str, ...], allowed_host: tuple[str, ...],
              hash_for: Optional[str]) -> None:
    """Serve the web dashboard: runs, their DAGs, logs, workers and schedules, live.

    It reads everything from Redis (through the same functions as 'orch status' and 'orch logs'),
    so it runs anywhere that reaches Redis. Open http://HOST:PORT/.
    """
    if hash_for is not None:
        password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
        if not password:
            raise CliError("an empty password: give one")
        click.echo(f"{hash_for}:{hash_password(password)}")
        return
    try:
        import uvicorn

        from orchestrator.dashboard.app import MAX_STREAMS, create_app
    except ImportError as exc:
        raise CliError(f"the dashboard needs its extra ({exc.name} is missing): pip install \"orch[dashboard]\"") \
            from None
    users = load_users(auth_file)
    check_bind(host, users, insecure_no_auth)
    allow_only(allow)  # as 'orch coordinator --allow': what a triggered schedule may load
    for path in reversed(paths):
        sys.path.insert(0, os.path.abspath(path))
    url = options.require_redis_url("dashboard")
    _check_port(host, port)
    connection = connect(url, check=True)
    app = create_app(connection, users, os.environ.get(SECRET_ENV) or None,
                     allowed_hosts=allowed_hosts(host, users, allowed_host))
    login = "login required" if users.required else "no login"
    click.echo(f"orch dashboard on http://{host}:{port}/ ({login}), reading {redacted(url)}", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False,
                limit_concurrency=MAX_STREAMS + 50)
