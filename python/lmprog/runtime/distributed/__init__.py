"""Tensor parallelism on torch.distributed: one scheduler driving N model ranks.

    rank 0 (the scheduler's process)           ranks 1..N-1 (tp_worker.py, one process each)
      schedule -> ForwardBatch                   wait for the next step
      step_sync.send(batch, pool ops) ───────►   apply the pool ops, rebuild the ForwardBatch
      model forward  ◄──── all-reduce / all-gather ────►  the same forward on their shard
      sample from the gathered logits            (their copy of the logits is dropped)

Only rank 0 schedules, owns the allocator and the prefix cache, and samples; the other ranks
mirror the two pools' contents (which request row maps which KV slots, and fork copies of KV)
from the journal rank 0 sends with each step, so every rank reads the same slots of its own
heads. `parallel_state.py` holds the groups, `partition.py` how a model splits,
`step_sync.py` the per-step message, `tp_worker.py` the worker processes.
"""
