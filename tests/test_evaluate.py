"""The evaluation job end to end: latents with held-out shards -> train -> generate (latents saved) -> evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline.common.config import ConfigError, EbdError, from_dict
from pipeline.evaluation.baselines import moment_matched_gaussian
from pipeline.evaluation.evaluator_fit import FitEvaluatorConfig, fit_evaluator
from pipeline.evaluation.features import ImageEvaluator
from pipeline.evaluation.report import EvaluateConfig, run_evaluation
from pipeline.generation import GenerateConfig, run_generation
from pipeline.io.latent_shards import write_latent_dataset
from pipeline.training.config import TrainConfig
from pipeline.training.job import run_training
from tests.conftest import REPO, mixture


@dataclass
class Run:
    latents: Path        # the session's mixture latents (conftest), the last two shards held out
    model: Path          # the session's trained conditional energy
    root: Path           # gen/ (300 images), gen-heun/ (300, another sampler), gen-cond/ (40 per mode), evaluator/


@pytest.fixture(scope="module")
def pipeline_run(trained_energy, mixture_latents, sd_checkpoint, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("evaluate")
    model = trained_energy / "model"
    # the second: a row to --compare; the third asks the (label-conditional) energy for each mode
    heun = {"num_images": 300, "sampler": {"name": "heun", "levels": 25}}
    for folder, extra in (("gen", {"num_images": 300}), ("gen-heun", heun),
                          ("gen-cond", {"conditions": {"label=upper": 40, "label=lower": 40},
                                        "sampler": {"guidance": 5.0}})):  # a small energy conditions weakly: guide
        run_generation(from_dict(GenerateConfig, dict(model=str(model), vae=str(sd_checkpoint),
                                                      output=str(root / folder), images_per_shard=100,
                                                      format="parquet", progress_interval_s=0.0) | extra))
    # The latents carry their mode as a label, so the evaluator is a classifier of the two modes, and has an
    # attribute classifier of that label for scoring conditions.
    fit_evaluator(from_dict(FitEvaluatorConfig, dict(latents=str(mixture_latents), output=str(root / "evaluator"),
                                                     holdout_shards=2, resolution=8, widths=[8, 16], feature_dim=16,
                                                     steps=100, batch_size=32, shift=1, log_every=50,
                                                     attribute_fields=["label"], attribute_resolution=8,
                                                     attribute_widths=[8, 16], attribute_steps=100)))
    return Run(mixture_latents, model, root)


@pytest.mark.integration
def test_report_scores_the_model_against_held_out_shards_with_baselines(pipeline_run):
    run, root = pipeline_run, pipeline_run.root
    report = run_evaluation(from_dict(EvaluateConfig, dict(generated=str(root / "gen"),
                                                           reference=str(run.latents),
                                                           evaluator=str(root / "evaluator"),
                                                           output=str(root / "report"), num_samples=256,
                                                           memorisation_pool=512, image_side=8, realism_epochs=2,
                                                           compare=[str(root / "gen-heun")])))
    compared = ("gen-heun (heun)", "gen-heun (heun): starts")
    assert report["held_out_shards"] == ["latents-000006.tar", "latents-000007.tar"]  # the last two, never trained
    assert report["train_shards"] == 6 and report["samples"] == 256
    for space in ("latents", "images"):
        m = report["spaces"][space]["metrics"]
        assert set(m) == {"generated", "train", "gaussian", "untrained", "starts", *compared}
        # The floor: real training data scored against held-out real data looks like one distribution.
        assert m["train"]["coverage"] > 0.8 and 0.7 < m["train"]["density"] < 1.3, (space, m["train"])
    m = report["spaces"]["latents"]["metrics"]
    # The trained EBM puts its samples on the two modes; the moment-matched Gaussian fills the gap between them.
    assert m["generated"]["density"] > m["gaussian"]["density"] + 0.1, m
    assert m["generated"]["mmd"] < m["gaussian"]["mmd"], m
    assert m["untrained"]["coverage"] < m["generated"]["coverage"], m
    assert m["starts"]["density"] < m["generated"]["density"], m  # the sampler is what moves the samples
    # The compared run (same energy, deterministic sampler) is a working model too, and so is not its noise.
    assert m["gen-heun (heun)"]["density"] > m["gaussian"]["density"] + 0.1, m
    assert m["gen-heun (heun): starts"]["density"] < 0.1, m
    gain = report["spaces"]["latents"]["energy_gain"]
    assert gain["density"] == pytest.approx(m["generated"]["density"] - m["starts"]["density"], abs=1e-3)

    # The evaluator's feature space: distribution, label and memorisation metrics for every row; the raw images are
    # not there (these latents were never images), and the report says so.
    features = report["features"]["evaluator"]
    assert features["classes"] == ["lower", "upper", "(none of these)"] and set(features["metrics"]) == {
        "generated", "train", "blurred", "gaussian", "untrained", "starts", "near_copies", *compared}
    f = features["metrics"]
    assert f["train"]["copy_share"] == 1.0  # the copier is caught (the near-copier, at 64 px: test_yardstick.py)
    assert f["train"]["class_tv"] < 0.1 and features["reference"]["class_histogram"][1] > 0.5, features["reference"]
    assert all(0 <= m["recognisable"] <= 1 and abs(sum(m["class_histogram"]) - 1) < 1e-3 for m in f.values())
    assert f["generated"]["copy_share"] < 0.5 and features["reference"]["copy_share"] == pytest.approx(0.05, abs=0.01)
    from pipeline.io.image_shards import read_generated
    # Beside the table (256 against 256), the class mix of every one of the run's 300 images, with its own noise.
    evaluator = ImageEvaluator.from_pretrained(root / "evaluator")
    probs = evaluator.probabilities(read_generated(root / "gen")[1])
    every = features["generated_all"]
    assert every["images"] == 300
    assert every["class_histogram"] == pytest.approx((torch.bincount(probs.argmax(1), minlength=3) / 300).tolist(),
                                                     abs=1e-4)
    recognised = (probs[:, :2].max(1).values >= evaluator.confidence).double().mean().item()  # never "none"
    assert every["recognisable"] == pytest.approx(recognised, abs=1e-4)
    assert every["class_tv_noise"]["mean"] < features["reference"]["class_tv_noise"]["mean"]  # more images, less
    noise = features["reference"]["class_tv_noise"]  # what 256 against 256 of real's own mix reads: a fair yardstick
    assert 0 < noise["mean"] < noise["p95"] < 0.15, noise
    assert all(v["fd"] >= 0 and v["kid_std"] >= 0 for v in f.values()), f
    assert any("raw held-out images could not be read" in note for note in report["notes"])
    # The realism test: every row against the reference on pixels, the control (training real) among them
    realism = report["realism"]["rows"]
    assert set(realism) == set(features["metrics"]) and report["realism"]["control"] == "train"
    assert all(r["images"] == 256 and 0 <= r["accuracy"] <= 1 for r in realism.values())
    assert realism["blurred"]["accuracy"] > realism["train"]["accuracy"]
    assert any(name.startswith("realism") for name in report["checks"]["features (evaluator)"])
    assert set(report["checks"]) == {"features (evaluator)", "latents", "images"}
    assert report["check_space"] == "features (evaluator)"
    assert report["passed"] == all(report["checks"]["features (evaluator)"].values())
    saved = json.loads((root / "report" / "report.json").read_text())
    assert saved["spaces"] == report["spaces"] and saved["features"] == report["features"]
    text = (root / "report" / "report.md").read_text()
    assert text.index("## Feature space") < text.index("## Pooled latents")  # what a person sees comes first
    verdict = report["checks"]["features (evaluator)"]  # the first line says how many pass and which failed
    failed = [name for name, ok in verdict.items() if not ok]
    assert text.splitlines()[2].startswith(f"**{'PASSED' if report['passed'] else 'FAILED'}**: "
                                           f"{len(verdict) - len(failed)} of {len(verdict)} checks pass"
                                           + (f" (failed: {'; '.join(failed)})" if failed else "") + ", verdict on ")
    assert f"into real's proportions reads {noise['mean']:.3f} on average at 256 against 256" in " ".join(text.split())
    assert f"Over all 300 generated images (`label_samples`): recognisable {every['recognisable']:.3f}" in text
    assert "moment-matched Gaussian" in text and "samples-vs-real.png" in text and "per-class.png" in text
    assert text.count("| gen-heun (heun) |") == 4  # a row in the feature, realism and both pooled tables
    assert f"density {gain['density']:+.3f}" in text  # the energy's share, spelled out
    from PIL import Image
    grid = Image.open(root / "report" / "samples-vs-real.png")
    assert grid.width > 2 * 8 * 8 and grid.height == 8 * 8  # two 8 x 8 grids of 8 px images side by side
    assert Image.open(root / "report" / "memorisation.png").height > 2 * 8
    assert Image.open(root / "report" / "realism.png").height > 4 * 8  # most and least often taken for real
    assert Image.open(root / "report" / "per-class.png").height >= 4 * 8  # a real and a generated row per class


@pytest.mark.integration
def test_a_conditional_run_is_scored_per_condition_by_the_evaluators_attribute_classifier(pipeline_run):
    run, root = pipeline_run, pipeline_run.root
    report = run_evaluation(from_dict(EvaluateConfig, dict(generated=str(root / "gen-cond"),
                                                           reference=str(run.latents),
                                                           evaluator=str(root / "evaluator"),
                                                           output=str(root / "report-cond"), num_samples=80,
                                                           memorisation_pool=512, image_side=8, realism_epochs=2)))
    conditions = report["conditions"]["scores"]
    assert report["conditions"]["attribute_accuracy"]["label"] >= 0.95  # the yardstick reads the mode
    assert list(conditions) == ["label=upper", "label=lower"]
    assert [c["images"] for c in conditions.values()] == [40, 40]  # every row of the run, by its stored condition
    for text, c in conditions.items():  # each mode is asked for and made (unasked: 0.7 upper / 0.3 lower)
        assert c["terms"] == {text: c["all_terms"]} and c["all_terms"] >= 0.8, conditions
    text = (root / "report-cond" / "report.md").read_text()
    lower = conditions["label=lower"]["all_terms"]
    assert "## Conditions" in text and f"| label=lower | 40 | label=lower {lower:.3f}" in text
    from PIL import Image
    assert Image.open(root / "report-cond" / "conditions.png").height >= 4 * 8  # two rows of samples per condition
    # the asked-for 40/40 mix is not the data's 70/30: class proportions are not judged, each condition is
    verdict = report["checks"][report["check_space"]]
    assert not any(name.startswith("class TV") for name in verdict)
    assert report["features"]["evaluator"]["generated_all"] is None and "Over all" not in text  # all 80 scored
    assert verdict["label=lower: meets every term in >= 0.5 of its images"] is True
    from pipeline.evaluation.report import plain_summary
    words = plain_summary(report, "R")
    assert words[0].startswith(f"verdict in the {report['check_space']} space: ")
    assert words[-1] == "  details: R/report.md"
    assert any("judged per condition" in line for line in words)


@pytest.mark.integration
def test_an_evaluator_of_another_vae_and_a_verdict_without_a_feature_space_are_refused(pipeline_run, tmp_path):
    run, root = pipeline_run, pipeline_run.root
    other = ImageEvaluator.from_pretrained(root / "evaluator")
    other.config["vae"] = {"weights_sha256": "0" * 64}
    other.save_pretrained(tmp_path / "other-evaluator")
    with pytest.raises(EbdError, match="fitted for another VAE"):
        run_evaluation(from_dict(EvaluateConfig, dict(generated=str(root / "gen"), reference=str(run.latents),
                                                      evaluator=str(tmp_path / "other-evaluator"),
                                                      output=str(tmp_path / "r"))))
    with pytest.raises(ConfigError, match="pass --evaluator DIR"):
        from_dict(EvaluateConfig, dict(generated="g", reference="r", output="o"))


def test_holding_out_shards_of_a_folder_written_in_input_order_is_refused(tmp_path):
    write_latent_dataset(tmp_path / "latents", mixture(64, seed=2), shard_size=32)  # not shuffled
    with pytest.raises(ConfigError, match="not a random sample"):
        run_training(from_dict(TrainConfig, dict(latents=str(tmp_path / "latents"), output=str(tmp_path / "ebm"),
                                                 holdout_shards=1)))


def test_moment_matched_gaussian_has_the_data_mean_and_covariance():
    data = torch.randn(4000, 3, generator=torch.Generator().manual_seed(1)) @ torch.tensor(
        [[2.0, 0, 0], [0.5, 1.0, 0], [0, 0, 0.1]]) + torch.tensor([1., -2, 3])
    samples = moment_matched_gaussian(data, 20000, torch.Generator().manual_seed(0))
    assert torch.allclose(samples.mean(0), data.mean(0), atol=0.06)
    assert torch.allclose(torch.cov(samples.T), torch.cov(data.T), atol=0.08)


@pytest.mark.integration
def test_check_flag_fails_the_job_in_one_line_when_a_threshold_is_missed(pipeline_run, tmp_path):
    run, root = pipeline_run, pipeline_run.root
    result = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", "--generated", str(root / "gen"), "--reference",
         str(run.latents), "--output", str(tmp_path / "r"), "--num-samples", "100", "--check", "--seeds", "3",
         "--set", "min_density=50", "--set", "check_space=latents", "--set", "realism_folds=0"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "error: quality check failed: density >= 50.0"
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["passed"] is False
    # --seeds 3: three draws of 100 of the run's 300 images, each a row; the spread is over those rows
    seeds, rows = report["seeds"], report["spaces"]["latents"]["metrics"]
    assert seeds["rows"] == ["generated", "generated #2", "generated #3"] and seeds["images"] == 100
    density = [rows[name]["density"] for name in seeds["rows"]]
    assert seeds["figures"]["density"]["mean"] == pytest.approx(sum(density) / 3, abs=1e-4)
    assert seeds["figures"]["density"]["min"] == min(density) and seeds["passed"] == [False] * 3
    assert "Over 3 draws of 100 generated images" in (tmp_path / "r" / "report.md").read_text()
    assert "[evaluate] Over 3 draws" in result.stdout


@pytest.mark.integration
def test_the_draws_of_seeds_are_disjoint_sets_of_the_run(pipeline_run, tmp_path):
    from pipeline.evaluation.report import load_inputs, read_rows
    cfg = from_dict(EvaluateConfig, dict(generated=str(pipeline_run.root / "gen"), reference=str(pipeline_run.latents),
                                         output=str(tmp_path / "r"), check_space="latents", num_samples=100, seeds=4))
    rows = read_rows(cfg, load_inputs(cfg))
    assert rows["n"] == 75  # 300 images, four draws: the set size shrinks to what the run holds
    draws = [rows["sets"]["generated"], *(rows["sets"][f"generated #{k}"] for k in (2, 3, 4))]
    everything = torch.cat(draws).flatten(1)
    assert everything.shape[0] == 300 and torch.unique(everything, dim=0).shape[0] == 300  # no chain twice
    assert rows["draw_images"]["generated #2"].shape[0] == 75


@pytest.mark.integration
def test_refuses_runs_without_latents_and_references_of_another_vae(pipeline_run, sd_checkpoint, tmp_path):
    run, root = pipeline_run, pipeline_run.root
    run_generation(from_dict(GenerateConfig, dict(model=str(run.model), vae=str(sd_checkpoint),
                                                  output=str(tmp_path / "gen"), num_images=10, save_latents=False,
                                                  format="webdataset", progress_interval_s=0.0)))
    with pytest.raises(EbdError, match="without its latents"):
        run_evaluation(from_dict(EvaluateConfig, dict(generated=str(tmp_path / "gen"), check_space="latents",
                                                      reference=str(run.latents), output=str(tmp_path / "r"))))
    other = tmp_path / "other-latents"
    write_latent_dataset(other, mixture(64, seed=1), vae={"weights_sha256": "0" * 64})
    with pytest.raises(EbdError, match="another VAE"):
        run_evaluation(from_dict(EvaluateConfig, dict(generated=str(root / "gen"), reference=str(other),
                                                      check_space="latents", output=str(tmp_path / "r"))))


@pytest.mark.integration
def test_only_the_chosen_rows_are_read_in_the_chosen_order(pipeline_run):
    """Evaluation reads the rows it samples, shard by shard, not the whole run: a picked subset equals the full
    read indexed the same way, for generated runs and latent shards alike."""
    from pipeline.evaluation.references import read_latents
    from pipeline.io.image_shards import iter_generated_images, read_generated

    index = torch.tensor([250, 3, 101, 99, 0])
    all_latents, all_images = read_generated(pipeline_run.root / "gen")
    latents, images = read_generated(pipeline_run.root / "gen", index)
    assert len(all_latents) == 300
    assert torch.equal(latents, all_latents[index]) and torch.equal(images, all_images[index])
    files = ["latents-000000.tar", "latents-000001.tar"]
    full, some = read_latents(pipeline_run.latents, files), read_latents(pipeline_run.latents, files, index)
    assert torch.equal(some["latents"], full["latents"][index])
    assert some["keys"] == [full["keys"][i] for i in index.tolist()]
    with pytest.raises(EbdError, match="fewer rows than its manifest"):
        read_latents(pipeline_run.latents, files, torch.tensor([600]))
    # The class metrics' stream: the named rows in row order, in batches, one pass; a row past the end is refused.
    batches = list(iter_generated_images(pipeline_run.root / "gen", index, batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat(batches), all_images[index.sort().values])
    with pytest.raises(EbdError, match="fewer rows than its manifest"):
        list(iter_generated_images(pipeline_run.root / "gen", torch.tensor([5, 300])))


@pytest.mark.integration
def test_the_class_metrics_read_up_to_label_samples_more_rows_and_the_scored_rows_stay_the_seeds(pipeline_run):
    from pipeline.evaluation.report import load_inputs, read_rows

    def rows(**extra):
        cfg = from_dict(EvaluateConfig, dict(generated=str(pipeline_run.root / "gen"), reference=str(
            pipeline_run.latents), output="unused", check_space="latents", num_samples=100, memorisation_pool=200)
            | extra)
        return read_rows(cfg, load_inputs(cfg))

    some, none = rows(label_samples=280), rows(label_samples=50)
    seeded = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    assert torch.equal(some["gen_index"], seeded[:100]) and torch.equal(none["gen_index"], seeded[:100])
    assert torch.equal(some["label_index"], seeded[100:280]) and len(none["label_index"]) == 0


@pytest.mark.parametrize("checks", [{"density >= 0.7": False, "class TV <= 0.1": False, "FD <= 0.5 x real": True},
                                    {"density >= 0.7": True}])
def test_make_demo_prints_each_reports_verdict_line(checks, tmp_path):
    """`make demo` ends by printing each run's verdict, read from report.md by a sed expression in the Makefile:
    it finds the line render_markdown writes, with the count and the failed checks."""
    import re

    from pipeline.evaluation.markdown import verdict_line

    report = {"checks": {"features (evaluator)": checks}, "check_space": "features (evaluator)",
              "passed": all(checks.values())}
    (tmp_path / "report.md").write_text(f"# Sample quality: model-x\n\n{verdict_line(report)} 1000 samples.\n")
    makefile = (REPO / "Makefile").read_text()
    expression = re.search(r"^VERDICT_LINE := sed -n '([^']+)'$", makefile, flags=re.M).group(1)
    printed_for = set(re.findall(r"\$\(VERDICT_LINE\) \$\((\w+)\)-report/report.md", makefile))
    assert printed_for == {"GENERATED", "EMOJI_GENERATED"}
    failed = [name for name, ok in checks.items() if not ok]
    expected = (f"{'PASSED' if not failed else 'FAILED'}: {len(checks) - len(failed)} of {len(checks)} checks pass"
                + (f" (failed: {'; '.join(failed)})" if failed else ""))
    printed = subprocess.run(["sed", "-n", expression, str(tmp_path / "report.md")],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert printed == expected
