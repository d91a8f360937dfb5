"""`python -m lmprog.launch_server [--model-path ...] [--port 30000] ...`: serve a model over HTTP.

Every flag is a ServerArgs field (`--help` lists them); with no flag the embedded default model
is served on 127.0.0.1:30000. `--dp-size N` serves N replicas behind the router (lmprog.router).
`--tp-size N` splits the model over N ranks; with `--nnodes M`, the machine of `--node-rank 0`
serves HTTP and the others (`--node-rank 1..M-1`, the same `--dist-init-addr`) run their ranks.
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
    if args.node_rank > 0:
        from lmprog.runtime.distributed.tp_worker import run_node

        return run_node(args)
    if args.dp_size > 1:
        from lmprog.router.__main__ import main as router_main

        flags = sys.argv[1:] if argv is None else argv
        return router_main(["--host", args.host, "--port", str(args.port), *flags])
    from lmprog.runtime.entrypoints.http_server import launch_server

    return launch_server(args)


if __name__ == "__main__":
    sys.exit(main())
