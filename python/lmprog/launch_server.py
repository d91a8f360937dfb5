"""`python -m lmprog.launch_server [--model-path ...] [--port 30000] ...`: serve a model over HTTP.

Every flag is a ServerArgs field (`--help` lists them); with no flag the embedded default model
is served on 127.0.0.1:30000.
"""

from __future__ import annotations

import argparse
import sys

from lmprog.runtime.server_args import ServerArgs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmprog.launch_server", description="Serve a language model over HTTP."
    )
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(argv)
    try:
        args = ServerArgs.from_cli_args(ns)
    except ValueError as e:
        parser.error(str(e))
    from lmprog.runtime.entrypoints.http_server import launch_server

    return launch_server(args)


if __name__ == "__main__":
    sys.exit(main())
