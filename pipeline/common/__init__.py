"""What every layer uses: job configs and one-line errors (`config`), logging and progress (`logs`), batch sizes
probed against memory with out-of-memory recovery (`memory`), Prometheus metrics (`metrics`)."""
