"""Data parallelism: a router in front of several lmprog servers (`python -m lmprog.router`).

policies.py chooses a worker per request, prefix_tree.py remembers what text each worker has
served (for the cache-aware policy), workers.py keeps the registry and health checks, app.py is
the HTTP front, replicas.py starts local servers for `--dp-size`. Nothing here imports torch.
"""
