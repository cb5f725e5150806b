"""Entry points, one per job: `python -m jobs.NAME --help`. Each parses arguments and calls `pipeline`."""
