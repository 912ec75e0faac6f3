"""`bitrl-compile tracker`: TVM's RPC tracker for a farm of boards (targets/remote.py), in the foreground."""

from __future__ import annotations

import sys
import time

import click

from bitrl_compile.cli.common import guard


@click.command("tracker")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; keep 127.0.0.1: the tracker has no authentication (anyone who reaches it can "
                   "take the boards or register a fake one); boards reach it through `ssh -R` (docs/tuning.md)")
@click.option("--port", default=9190, show_default=True, type=click.IntRange(0, 65535), help="port (0: a free one)")
@click.option("--debug", is_flag=True, help="show tracebacks")
def tracker_cmd(host, port, debug):
    """TVM's RPC tracker: boards register their RPC servers with it under a key (rasp4, rasp5), and
    `bitrl-compile tune --tracker HOST:PORT --key KEY` measures on all of them in parallel. Prints the
    servers as they come and go; Ctrl-C stops it."""
    import signal

    from bitrl_compile.targets.remote import Tracker, register_help, servers_under

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the tracker on SIGTERM too
    try:
        with guard(debug), Tracker(host, port) as tracker:
            address = tracker.address
            click.echo(f"{address}  (TVM RPC tracker; Ctrl-C stops it)")
            click.echo(f"  boards: {register_help(address, 'rasp4')}", err=True)
            click.echo(f"  tuning: bitrl-compile tune MODEL --target rasp4 --tracker {address} --key rasp4", err=True)
            shown: dict[str, list[str]] = {}
            while True:
                summary = tracker.summary()
                keys = sorted(set(summary.get("queue_info", {})) | set(shown))
                now = {key: sorted(servers_under(summary, key)) for key in keys}
                for key in keys:
                    if now[key] != shown.get(key, []):
                        free = summary.get("queue_info", {}).get(key, {}).get("free", 0)
                        click.echo(f"{time.strftime('%H:%M:%S')} key {key}: {len(now[key])} server(s), {free} free"
                                   f"{': ' + ', '.join(now[key]) if now[key] else ''}", err=True)
                shown = now
                time.sleep(2)
    except KeyboardInterrupt:
        sys.exit(0)
