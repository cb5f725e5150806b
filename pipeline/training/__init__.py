"""Training: the job's driver on Ray Train (`job`), its config (`config`), the data each worker reads (`data`), the
loop each Ray Train worker runs (`loop`) and the objectives it can optimise (`objectives/`)."""
