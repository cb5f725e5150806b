"""The jobs that run on a Ray cluster, driver side: precompute (Ray tasks), generation (a Ray Data DAG of sampler,
decoder and writer stages) and training (Ray Train; the loop itself is `training/loop.py`)."""
