"""The study report: tables of mean ± std over seeds and plots, from per-run results."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_one_fatal_line, load_config, run_command, toy_config
from ddpm_ip_jax import study_lib as study
from ddpm_ip_jax import workdir
from ddpm_ip_jax.evaluation import metrics


def fake_results(gammas, seeds):
  rng = np.random.default_rng(0)
  out = {}
  for g in gammas:
    for s in seeds:
      samples = {k: {"fid": 10.0 - 10 * g + s, "precision": 0.5, "recall": 0.6}
                 for k in ("ancestral/10", "ancestral/100", "ddim/ddim10")}
      t = list(range(99, -1, -1))
      exposure = {"t_original": t, "nu_sampling": rng.random(100).tolist(), "nu_training": rng.random(100).tolist(),
                  "delta": rng.random(100).tolist(), "delta_sum": 1.0 + g, "chain_reconstruction_l1": 0.1}
      # A chain from respaced step 49 whose nu is 0.5 above the training nu at every one of its steps.
      nu_train_tail = np.asarray(exposure["nu_training"][-50:])
      mid = {"t_original": list(range(490, -1, -10)), "nu_sampling": (nu_train_tail + 0.5).tolist(),
             "delta": [0.01 * (1 + g)] * 50, "delta_sum": 0.5 * (1 + g)}
      authors = {"nu_one_step_t": list(range(0, 1000, 10)), "nu_one_step": rng.random(100).tolist(),
                 "nu_one_step_mean": 0.2 + 0.1 * g + 0.01 * s, "reconstruction_start": 599,
                 "reconstruction_l1": 0.3 - 0.1 * g}
      out[(g, s)] = {"samples": samples, "exposure": exposure, "exposure_from": {"49": mid},
                     "exposure_authors": authors, "step": 1500, "total_seconds": 60.0}
  return out


META = dict(command="python -m ddpm_ip_jax.study --seeds=0,1,2", dataset="digits", extractor="digits",
            exposure_respacing="100", exposure_images=256, machine="2 CPU cores")


def test_report_tables_and_plots(tmp_path):
  results = fake_results([0.0, 0.1], [0, 1, 2])
  study.write_report(results, str(tmp_path), META, [0.0, 0.1], [0, 1, 2])
  text = (tmp_path / "README.md").read_text()
  assert text.startswith("# Reproduction study: ADM vs ADM-IP on digits")
  assert "## digits-FID by sampler and number of steps" in text
  assert "![digits-FID](fid.png)" in text
  assert "## Exposure bias (ancestral, respacing 100, 256 training images)" in text
  # fid = 10 - 10 g + seed: mean over seeds 0,1,2 is 11 (gamma 0) and 10 (gamma 0.1), std 1.
  assert "| ancestral/10 | 11.00 ± 1.00 | 10.00 ± 1.00 |" in text
  # Paired by seed: 10 - 10 * 0.1 + s - (10 + s) = -1 for every seed.
  assert "| ancestral/10 | -1.00 ± 0.00 (3/3 better) |" in text
  assert "| sum of delta_t, chain from t = T | 1.0000 ± 0.0000 | 1.1000 ± 0.0000 |" in text
  assert "| sum of delta_t, chain from t = 490 | 0.5000 ± 0.0000 | 0.5500 ± 0.0000 |" in text
  assert "| mean nu_t gap, from t = 490 | 0.5000 ± 0.0000 | 0.5000 ± 0.0000 |" in text
  # The authors' measures come first, with their per-seed differences to gamma 0.
  authors_row = "| one-step nu_t, mean over t = 0, 10, ... (authors') |"
  assert f"{authors_row} 0.2100 ± 0.0100 | 0.2200 ± 0.0100 |" in text
  assert text.index(authors_row) < text.index("| sum of delta_t, chain from t = T |")
  assert f"{authors_row} +0.0100 ± 0.0000 (0/3 lower) |" in text
  assert "| deterministic reconstruction L1 from t = 599 (authors') | -0.0100 ± 0.0000 (3/3 lower) |" in text
  assert "Each run trained 1500 steps." in text
  assert "python -m ddpm_ip_jax.study --seeds=0,1,2" in text
  assert "Total time: 6 minutes" in text
  assert (tmp_path / "fid.png").stat().st_size > 5000 and (tmp_path / "exposure.png").stat().st_size > 5000


def test_a_ddim_only_study_reports_precision_recall_of_its_longest_chain(tmp_path):
  results = fake_results([0.0], [0])
  for r in results.values():
    r["samples"] = {"ddim/ddim10": r["samples"]["ddim/ddim10"], "ddim/ddim50": dict(fid=1.0, precision=0.25,
                                                                                     recall=0.75)}
  study.write_report(results, str(tmp_path), META, [0.0], [0])
  text = (tmp_path / "README.md").read_text()
  assert "## Precision / recall (ddim/ddim50 steps)" in text and "| precision | 0.250 ± 0.000 |" in text


def test_results_round_trip_keeps_only_complete_seeds(tmp_path):
  results = fake_results([0.0, 0.1, 0.2], [0, 1])
  del results[(0.2, 1)]  # an interrupted study: seed 1 lacks one gamma
  study.save_results(str(tmp_path / "results.json"), META, results)
  meta, loaded, gammas, seeds = study.load_results(str(tmp_path / "results.json"))
  assert meta == META and gammas == [0.0, 0.1, 0.2] and seeds == [0]
  assert loaded[(0.1, 1)]["samples"] == results[(0.1, 1)]["samples"]


def _pixel_extractor():
  """A stand-in feature network: 2x2-pooled pixels of the 8x8 toy digits (16 features)."""
  def apply_fn(params, images):
    x = images.astype(jnp.float32) / 255.0
    b, h, w, c = x.shape
    return {"pool": x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).reshape(b, -1) * params}
  return metrics.FeatureExtractor(name="pixels", apply_fn=apply_fn, params=jnp.float32(1.0), channels=1)


@pytest.mark.slow
def test_study_end_to_end_and_rerun_reuses_everything(tmp_path):
  """Two gammas x one seed on the toy digits: trains, samples, scores, measures and reports; a second call
  finds every run and sample directory done and returns the same numbers."""
  base = toy_config(num_train_steps=2)
  kwargs = dict(workdir=str(tmp_path / "runs"), docs=str(tmp_path / "docs"), gammas=[0.0, 0.1], seeds=[0],
                extractor=_pixel_extractor(), ancestral_steps=[2, 5], ddim_steps=[2], num_samples=20,
                per_device_batch=5, exposure_start_steps=[4], exposure_respacing="10", exposure_images=8,
                command="python -m ddpm_ip_jax.study --test")
  first = study.run_study(base, **kwargs)
  assert set(first) == {(0.0, 0), (0.1, 0)}
  for r in first.values():
    assert r["step"] == 2
    assert set(r["samples"]) == {"ancestral/2", "ancestral/5", "ddim/ddim2"}
    assert all(np.isfinite(v["fid"]) and v["num_samples"] == 20 for v in r["samples"].values())
    assert len(r["exposure"]["delta"]) == 10 and len(r["exposure_from"]["4"]["delta"]) == 5
  text = (tmp_path / "docs" / "README.md").read_text()
  assert "| ancestral/5 |" in text and "sum of delta_t, chain from t = 4 |" in text
  meta, saved, gammas, seeds = study.load_results(str(tmp_path / "docs" / "results.json"))
  assert gammas == [0.0, 0.1] and seeds == [0] and meta["extractor"] == "pixels" and meta["exposure_images"] == 8
  assert saved[(0.1, 0)]["samples"] == first[(0.1, 0)]["samples"]
  # The two gammas train differently (same seed, same data: only the perturbation differs).
  p0, p1 = (workdir.load_model(workdir=str(tmp_path / "runs" / f"gamma{g}_seed0")).params
            for g in ("0", "0.1"))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))

  (tmp_path / "docs" / "notes.md").write_text("## What the numbers show\n\nhand-written")
  again = study.run_study(base, **kwargs)
  for key, r in first.items():
    assert again[key]["samples"] == r["samples"]
    assert again[key]["exposure"]["delta_sum"] == r["exposure"]["delta_sum"]
  assert (tmp_path / "docs" / "README.md").read_text().endswith("hand-written")

  # --report_only rewrites the report from results.json alone (here after editing the notes).
  (tmp_path / "docs" / "notes.md").write_text("edited notes")
  (tmp_path / "docs" / "fid.png").unlink()
  proc = run_command("study", "--report_only", f"--docs={tmp_path / 'docs'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = (tmp_path / "docs" / "README.md").read_text()
  assert text.endswith("edited notes") and "| ancestral/5 |" in text and (tmp_path / "docs" / "fid.png").exists()


def test_study_rejects_a_respacing_the_diffusion_cannot_take_before_training(tmp_path):
  base = load_config("digits")
  base.diffusion.steps = 10
  with pytest.raises(ValueError, match="respacing '100'"):
    study.run_study(base, workdir=str(tmp_path), docs=str(tmp_path / "docs"), gammas=[0.0], seeds=[0],
                    extractor=_pixel_extractor(), ancestral_steps=[5], ddim_steps=[], num_samples=4,
                    per_device_batch=2, exposure_respacing="100")
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_the_default_config_missing_outside_the_repository_is_one_fatal_line(tmp_path):
  """The study's default --config (configs/digits.py) is relative to the working directory, like its --workdir and
  --docs: run elsewhere, one FATAL line naming it, not config_flags' traceback."""
  proc = run_command("study", cwd=tmp_path)
  assert_one_fatal_line(proc, "--config=configs/digits.py: no such file")
  assert os.listdir(tmp_path) == []
