"""The processes of tensor-parallel ranks 1..N-1: each loads its shard and mirrors rank 0's steps.

Whoever holds rank 0 starts the other ranks of its machine (`start_local_workers`): the server's
launcher, or the offline `LLM` in the user's process. On a machine of a multi-node run that does
not hold rank 0 (`--node-rank` > 0), `launch_server` starts that machine's ranks and waits.
A worker exits when rank 0 says stop or when rank 0 is gone (its next wait fails at once).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
import sys

from lmprog.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)


def local_ranks(args: ServerArgs) -> range:
    """The tensor-parallel ranks that run on this machine (node_rank's share of tp_size)."""
    per_node = args.tp_size // args.nnodes
    return range(args.node_rank * per_node, (args.node_rank + 1) * per_node)


def with_init_addr(args: ServerArgs) -> ServerArgs:
    """`args` with `dist_init_addr` set: a free local port when one machine runs every rank."""
    if args.tp_size == 1 or args.dist_init_addr is not None:
        return args
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return args.replace(dist_init_addr=f"127.0.0.1:{port}")


def start_local_workers(args: ServerArgs) -> list[mp.Process]:
    """Starts this machine's ranks other than 0 (spawned, daemonic: they die with the caller)."""
    ctx = mp.get_context("spawn")
    procs = []
    for rank in local_ranks(args):
        if rank == 0:
            continue
        proc = ctx.Process(
            target=run_tp_worker, args=(args, rank), name=f"lmprog-tp{rank}", daemon=True
        )
        proc.start()
        procs.append(proc)
    return procs


def dead_worker(procs: list[mp.Process]) -> str | None:
    """What happened to the first worker that exited, or None while all run."""
    for proc in procs:
        if not proc.is_alive():
            rank = proc.name.removeprefix("lmprog-tp")
            return f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
    return None


def run_node(args: ServerArgs) -> int:
    """A machine of a multi-node run that does not hold rank 0 (`--node-rank` > 0): runs its
    ranks until they exit (rank 0 stopped or was lost); the exit code is the worst of theirs."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ranks = list(local_ranks(args))
    print(
        f"node {args.node_rank} of {args.nnodes}: tensor-parallel ranks {ranks[0]}-{ranks[-1]} "
        f"of {args.tp_size}, joining {args.dist_init_addr}",
        flush=True,
    )
    procs = start_local_workers(args)
    try:
        for proc in procs:
            proc.join()
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
    return max((abs(proc.exitcode or 0) for proc in procs), default=0)


def run_tp_worker(args: ServerArgs, rank: int) -> None:
    """Process entry of rank `rank`: load the shard, then run every step rank 0 sends."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp{rank} %(message)s")
    from lmprog.runtime.distributed.step_sync import receive_step
    from lmprog.runtime.model_executor.model_runner import ModelRunner

    runner = ModelRunner(args, tp_rank=rank)
    try:
        while (batch := receive_step(runner.tp, runner)) is not None:
            runner.forward(batch)
    except RuntimeError as e:
        logger.error("rank 0 is gone; exiting (%s)", str(e).splitlines()[0])
        sys.exit(1)
    finally:
        runner.shutdown()
