"""Where data lives and how it is written: storage (local or object store), atomic files and run records, tars,
latent shards, generated-image shards (writer and reader), input sources and image decoding, weights folders,
training-state checkpoints, picture grids. Nothing here knows a model or a sampler."""
