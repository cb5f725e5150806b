"""Evaluation: how good a generation run is, and why.

    report          jobs.evaluate: a run against held-out real latents, with baselines, in a feature space
    references      which shards are the reference and the training latents; raw images read back
    baselines       the Gaussian, untrained, chain-start, blurred and --compare rows
    scoring         metrics and checks per feature space; per-condition attribute scores
    markdown        report.md
    quality         the metrics themselves (FD, KID, precision/recall, density/coverage, MMD, labels, copies)
    features        feature extractors: the evaluator CNN (the decoder's domain) and FID Inception from a file
    evaluator_fit   jobs.fit_evaluator: fitting that evaluator
    inspection      jobs.inspect: the x-ray page of a model and its chains
"""
