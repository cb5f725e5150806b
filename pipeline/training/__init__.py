"""Training: the job's config (`config`), the data each worker reads (`data`), the loop each Ray Train worker runs
(`loop`) and the objectives it can optimise (`objectives/`). The Ray Train driver is `distributed/training.py`."""
