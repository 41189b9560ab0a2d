"""The study report: tables of mean ± std over seeds and plots, from per-run results."""
import numpy as np

from ddpm_ip_jax import study


def fake_results(gammas, seeds):
  rng = np.random.default_rng(0)
  out = {}
  for g in gammas:
    for s in seeds:
      samples = {k: {"fid": 10.0 - 10 * g + s, "precision": 0.5, "recall": 0.6}
                 for k in ("ancestral/10", "ancestral/100", "ddim/ddim10")}
      t = list(range(99, -1, -1))
      exposure = {"t_original": t, "nu_sampling": rng.random(100).tolist(), "nu_training": rng.random(100).tolist(),
                  "delta": rng.random(100).tolist(), "delta_sum": 1.0 + g, "reconstruction_l1": 0.1}
      # A chain from respaced step 49 whose nu is 0.5 above the training nu at every one of its steps.
      nu_train_tail = np.asarray(exposure["nu_training"][-50:])
      mid = {"t_original": list(range(490, -1, -10)), "nu_sampling": (nu_train_tail + 0.5).tolist(),
             "delta": [0.01 * (1 + g)] * 50, "delta_sum": 0.5 * (1 + g)}
      out[(g, s)] = {"samples": samples, "exposure": exposure, "exposure_from": {"49": mid}, "step": 1500,
                     "total_seconds": 60.0}
  return out


def test_report_tables_and_plots(tmp_path):
  results = fake_results([0.0, 0.1], [0, 1, 2])
  study.write_report(results, str(tmp_path), "python -m ddpm_ip_jax.study --seeds=0,1,2", [0.0, 0.1], [0, 1, 2])
  text = (tmp_path / "README.md").read_text()
  # fid = 10 - 10 g + seed: mean over seeds 0,1,2 is 11 (gamma 0) and 10 (gamma 0.1), std 1.
  assert "| ancestral/10 | 11.00 ± 1.00 | 10.00 ± 1.00 |" in text
  assert "| sum of delta_t, chain from t = T | 1.0000 ± 0.0000 | 1.1000 ± 0.0000 |" in text
  assert "| sum of delta_t, chain from t = 490 | 0.5000 ± 0.0000 | 0.5500 ± 0.0000 |" in text
  assert "| mean nu_t gap, from t = 490 | 0.5000 ± 0.0000 | 0.5000 ± 0.0000 |" in text
  assert "Each run trained 1500 steps." in text
  assert "python -m ddpm_ip_jax.study --seeds=0,1,2" in text
  assert "Total time: 6 minutes" in text
  assert (tmp_path / "fid.png").stat().st_size > 5000 and (tmp_path / "exposure.png").stat().st_size > 5000
