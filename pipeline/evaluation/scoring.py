"""Scores in a feature space: every set's metrics against the reference, with label metrics when the extractor is a
classifier, memorisation against decoded training images, the checks each row gets, and per-condition attribute
scores of a conditional run."""

from __future__ import annotations

import numpy as np
import torch

from ..sampling.conditions import parse_condition
from . import quality


def score_feature_space(extractor, name: str, reference: torch.Tensor, reference_labels: list, sets: dict,
                        copies: dict, cfg, *, conditional: bool = False, more_generated=None) -> dict:
    """Every set's metrics against the reference in one extractor's feature space, with label metrics when the
    extractor is a classifier, each set's copy share (`copies`, measured on the images: copies.py), and the per-set
    checks.
    `more_generated()` yields batches of further generated images: a classifier's space then also reads the label
    metrics of all of them (`generated_all`), beside the table's rows, which stay n against n and comparable."""
    ref_features = extractor.features(reference)
    classes = list(extractor.classes)
    ref_probs = extractor.classify(ref_features) if classes else None
    ref_histogram = quality.class_histogram(ref_probs) if classes else None
    metrics, predicted, probabilities = {}, {}, {}
    for key, images in sets.items():
        features = extractor.features(images)
        m = quality.feature_metrics(ref_features, features)
        m["copy_share"] = copies["rows"][key]["copy_share"]
        if classes:
            probs = probabilities[key] = extractor.classify(features)
            m |= label_metrics(extractor, probs, ref_histogram)
            predicted[key] = probs.argmax(1)
        metrics[key] = {k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in m.items()}
    reference_row = {"copy_share": copies["reference_copy_share"]}
    if classes:
        reference_row |= {"recognisable": round(extractor.recognisable_share(ref_probs), 5),
                          "none_share": round(extractor.none_share(ref_probs), 5),
                          "class_histogram": [round(v, 4) for v in ref_histogram.tolist()],
                          "class_tv_noise": {k: round(v, 4) for k, v in quality.total_variation_noise(
                              ref_histogram, len(reference), len(reference)).items()}}
        truth = [classes.index(label) if label in classes else -1 for label in reference_labels]
        known = [i for i, t in enumerate(truth) if t >= 0]
        if known:
            reference_row["accuracy"] = round((ref_probs[known].argmax(1) == torch.tensor(truth)[known])
                                              .double().mean().item(), 5)
    checks = {key: feature_checks(m, metrics.get("gaussian"), reference_row, cfg, conditional and key == "generated")
              for key, m in metrics.items()}
    every = None
    if classes and more_generated is not None and "generated" in probabilities:
        every = label_metrics_of_every_image(extractor, probabilities["generated"], more_generated(), ref_histogram,
                                             len(reference))
    return {"extractor": name, "description": describe_extractor(extractor, name), "classes": classes,
            "none_class": getattr(extractor, "none_index", None) is not None,
            "reference": reference_row, "metrics": metrics, "checks": checks, "generated_all": every,
            "_predicted": predicted | ({"reference": _labels_or_predictions(reference_labels, classes, ref_probs)}
                                       if classes else {})}


def label_metrics_of_every_image(extractor, scored: torch.Tensor, more, ref_histogram: torch.Tensor,
                                 n_reference: int) -> dict | None:
    """The generated run's recognisable share and class TV over the scored rows' class probabilities (`scored`)
    and those of every batch `more` yields, with what sampling alone gives at that count against the reference's
    (class shares need no partner set, so more images mean less noise); None when `more` yields nothing."""
    extra = [extractor.classify(extractor.features(batch)) for batch in more]
    if not extra:
        return None
    probs = torch.cat([scored, *extra])
    noise = quality.total_variation_noise(ref_histogram, len(probs), n_reference)
    every = {k: round(v, 5) if isinstance(v, float) else v
             for k, v in label_metrics(extractor, probs, ref_histogram).items()}
    return {"images": len(probs)} | every | {"class_tv_noise": {k: round(v, 4) for k, v in noise.items()}}


def label_metrics(extractor, probs: torch.Tensor, ref_histogram: torch.Tensor) -> dict:
    """A set's label metrics from its class probabilities: recognisable share (a real class, never "none of
    these"), the share the evaluator calls none of its classes, class TV to the reference's histogram (the none
    class one of its bins: smears filed as none count against the mix), and its own histogram."""
    histogram = quality.class_histogram(probs)
    return {"recognisable": extractor.recognisable_share(probs), "none_share": extractor.none_share(probs),
            "class_tv": quality.total_variation(histogram, ref_histogram),
            "class_histogram": [round(v, 4) for v in histogram.tolist()]}


def _labels_or_predictions(labels: list, classes: list[str], probs: torch.Tensor) -> torch.Tensor:
    """The reference's true class where its label is one the evaluator knows, else the evaluator's prediction."""
    predicted = probs.argmax(1)
    return torch.tensor([classes.index(label) if label in classes else int(predicted[i])
                         for i, label in enumerate(labels)])


def feature_checks(m: dict, gaussian: dict | None, reference: dict, cfg, conditional: bool = False) -> dict[str, bool]:
    """The verdict's checks for one set. A conditional run asked for its own mix of classes, so comparing its class
    histogram with the reference's does not apply: it is judged per condition instead (condition_checks)."""
    checks = {}
    if gaussian is not None:
        checks[f"FD <= {cfg.max_fd_ratio} x the Gaussian's"] = m["fd"] <= cfg.max_fd_ratio * gaussian["fd"]
    checks[f"density >= {cfg.min_density}"] = m["density"] >= cfg.min_density
    checks[f"coverage >= {cfg.min_coverage}"] = m["coverage"] >= cfg.min_coverage
    if "recognisable" in m:
        checks[f"recognisable >= {cfg.min_recognisable_ratio} x real's"] = (
            m["recognisable"] >= cfg.min_recognisable_ratio * reference["recognisable"])
        if not conditional:
            bar = reference["class_tv_noise"]["p95"] if cfg.max_class_tv == "noise" else cfg.max_class_tv
            checks[f"class TV <= {bar:.3f}" + (" (sampling alone's 95th percentile)" if cfg.max_class_tv == "noise"
                                               else "")] = m["class_tv"] <= bar
    checks[f"copy share <= {cfg.max_copy_share}"] = m["copy_share"] <= cfg.max_copy_share
    return checks


def condition_checks(scores: dict, cfg) -> dict[str, bool]:
    """Per condition: the share of its images the evaluator's attribute classifiers find meeting every term."""
    return {f"{text}: meets every term in >= {cfg.min_condition_match:g} of its images": score["all_terms"] >=
            cfg.min_condition_match for text, score in scores.items() if score["all_terms"] is not None}


def describe_extractor(extractor, name: str) -> str:
    config = getattr(extractor, "config", None)
    if config is None:
        return "FID Inception v3 pool features (2048 dims), from the local weights file"
    held = config.get("held_out", {})
    text = (f"the {config['kind']} evaluator's penultimate layer ({config['feature_dim']} dims), fitted to this VAE's "
            f"decoded training latents")
    if "accuracy" in held:
        text += (f"; on {held['images']} decoded held-out latents it is {held['accuracy']:.3f} accurate and "
                 f"recognises {held['recognised']:.3f} (softmax >= {config['confidence']})")
    if "none_on_non_images" in held:
        text += (f"; it calls {held['none_on_non_images']:.3f} of {held['non_images']} held-out synthetic non-images "
                 f"(noise, mixes, blurs, shuffled patches) and {held['none_on_real']:.3f} of the real ones \"none of "
                 "these\"")
    return text


def pooled_checks(metrics: dict, cfg, row: str = "generated") -> dict[str, bool]:
    gen, gauss = metrics[row], metrics["gaussian"]
    return {f"density >= {cfg.min_density}": gen["density"] >= cfg.min_density,
            f"coverage >= {cfg.min_coverage}": gen["coverage"] >= cfg.min_coverage,
            "density above the Gaussian baseline": gen["density"] > gauss["density"],
            "coverage above the Gaussian baseline": gen["coverage"] > gauss["coverage"]}


def condition_scores(extractor, images: torch.Tensor, conditions: list[str], order: list[str] | None = None) -> dict:
    """Per condition, in `order` (default: first seen): its sample count, each term's share that the evaluator's
    attribute classifier for the term's field agrees with (None: no classifier for that field), and the share
    meeting every term (None unless every term was measured)."""
    predicted = {name: [values[i] for i in probs.argmax(1).tolist()]
                 for name, (values, probs) in extractor.attribute_probabilities(images).items()}
    scores = {}
    for text in dict.fromkeys(order or conditions):
        rows = [i for i, c in enumerate(conditions) if c == text]
        terms, met, measured = {}, np.ones(len(rows), dtype=bool), True
        for term in parse_condition(text):
            if term.field not in predicted:
                terms[str(term)], measured = None, False
                continue
            hit = np.array([(predicted[term.field][i] == term.value) != term.negated for i in rows])
            terms[str(term)] = round(float(hit.mean()), 4)
            met &= hit
        scores[text] = {"images": len(rows), "terms": terms,
                        "all_terms": round(float(met.mean()), 4) if measured else None}
    return scores
