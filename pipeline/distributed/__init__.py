"""What every Ray job shares (`cluster`): connecting to a cluster or starting a local instance, and quieting Ray's
per-report logs. Each job's driver lives with its domain: `generation/job.py`, `training/job.py`,
`vae/precompute.py`."""
