"""The small-scale reproduction study: ADM (gamma 0) against ADM-IP, several seeds, the same budget. The
command is `python -m ddpm_ip_jax.study`; `run_study` is callable from code.

For each (gamma, seed) it trains the config (resuming a run that is already there), then, with the EMA params,
draws `--num_samples` samples with ancestral sampling at each of `--ancestral_steps` and with DDIM at each of
`--ddim_steps`, scores them against the reference statistics of the training set with `--extractor` (the digits
classifier on the embedded default; Inception for CIFAR-10), and runs the exposure-bias measurements. It writes
`<docs>/results.json`, `<docs>/README.md` (tables with mean and spread over seeds, the commands, the time taken)
and plots. The same command with configs/cifar10.py and `--extractor=inception --weights=...` is the recipe for
a GPU/TPU.

A run whose samples or measurements come out NaN/Inf stops the study with one FATAL line, its results not
written. Ctrl-C or SIGTERM stops it after the training run (checkpointed), sampling batch or measurement in
progress, with one line saying what is kept (`interrupts`; exit 130 or 143); the same command resumes.
"""
import json
import os
import time

from absl import logging
import jax
import numpy as np

from ddpm_ip_jax import config_validation
from ddpm_ip_jax import diffusion as diffusion_lib
from ddpm_ip_jax import exposure
from ddpm_ip_jax import exposure_bias_lib
from ddpm_ip_jax import fileio
from ddpm_ip_jax import generation
from ddpm_ip_jax import images as images_lib
from ddpm_ip_jax import input_pipeline
from ddpm_ip_jax import interrupts
from ddpm_ip_jax import train
from ddpm_ip_jax import workdir as workdir_lib
from ddpm_ip_jax.evaluation import scoring


def run_one(config, workdir, *, extractor, reference, x0_real, ancestral_steps, ddim_steps, num_samples,
            per_device_batch, exposure_start_steps=(), exposure_respacing="100", kept=None):
  """Trains (or resumes) one run and returns its metrics: {sampler key: digits-FID etc., "exposure": ...}.

  Inside `interrupts.watch()` a signal stops it after the training (which checkpoints and returns early), a
  sampler's batch or a measurement, with `interrupts.Interrupted` saying `kept` (what the study keeps)."""
  t0 = time.time()
  train.train_and_evaluate(config, workdir)
  train_s = time.time() - t0
  loaded = workdir_lib.load_model(workdir=workdir)
  if loaded.step < config.training.num_train_steps:  # the training stopped early: a signal asked it to
    interrupts.check(f"the training of {workdir} stopped with a checkpoint at step {loaded.step} of "
                     f"{config.training.num_train_steps}; {kept}")
  interrupts.check(kept)
  results = {"train_seconds": round(train_s, 1), "step": loaded.step, "samples": {}}
  runs = [("ancestral", str(s)) for s in ancestral_steps] + [("ddim", f"ddim{s}") for s in ddim_steps]
  for sampler, respacing in runs:
    out_dir = fileio.join(workdir, f"study_samples_{sampler}_{respacing}")
    path = generation.generate(loaded.config, loaded.params, out_dir, num_samples=num_samples, sampler=sampler,
                               respacing=respacing, per_device_batch=per_device_batch, seed=1234,
                               description=loaded.description)
    interrupts.check(f"the samples of {out_dir} are complete; {kept}")
    results["samples"][f"{sampler}/{respacing}"] = scoring.score_samples(path, reference, extractor)
  # The authors' measures (one-step nu_t, deterministic reconstruction from 0.6 T - 1) first, then the chain's.
  measured = exposure_bias_lib.measure_model(
      loaded.config, loaded.params, x0_real, respacing=exposure_respacing, key_authors=jax.random.key(2),
      key_chain=jax.random.key(0), from_steps=exposure_start_steps, key_from=jax.random.key(1),
      check=lambda: interrupts.check(kept))
  results.update(exposure_authors=measured["authors"], exposure=measured["chain"], exposure_from=measured["from"])
  results["total_seconds"] = round(time.time() - t0, 1)
  return results


def _mean_std(values):
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _paired_cell(all_results, get, gamma, base_gamma, seeds, fmt="+.2f", word="better"):
  """"mean ± std (k/n <word>)" of get(run at gamma) - get(run at base_gamma) over the seeds, k counting the
  negative differences. Runs with the same seed share the initialisation and the data order: only the
  perturbation differs, so the per-seed difference is a sharper test than comparing the two means."""
  diffs = [get(all_results[(gamma, seed)]) - get(all_results[(base_gamma, seed)]) for seed in seeds]
  m, s = _mean_std(diffs)
  std_fmt = fmt.lstrip("+")
  count = sum(d < 0 for d in diffs)
  return f"{m:{fmt}} ± {s:{std_fmt}} ({count}/{len(diffs)} {word})"


def nu_gap(exposure, chain):
  """Mean over the chain's steps of nu_t(sampling) - nu_t(training inputs): how much worse the network predicts
  x0 on its own chain than on the inputs it was trained on (`exposure` holds nu_training for every step)."""
  n = len(chain["nu_sampling"])
  return float(np.mean(np.asarray(chain["nu_sampling"]) - np.asarray(exposure["nu_training"][-n:])))


METRIC_NAMES = {"digits": "digits-FID", "inception_v3_fid": "FID"}
METRIC_HELP = {
    "digits": "the Fréchet distance in the feature space of the project's digits classifier "
              "(`python -m ddpm_ip_jax.evaluation.digits_classifier`)",
    "inception_v3_fid": "the Fréchet distance of InceptionV3 pool features",
}


def _table_head(label, gammas):
  """The header and rule of a table with one column per gamma (`label` heads the first column)."""
  return ["| " + (f"{label} " if label else "") + "| " + " | ".join(f"gamma = {g}" for g in gammas) + " |",
          "|---|" + "---|" * len(gammas)]


def _mean_row(label, get, all_results, gammas, seeds, digits):
  """| label | mean ± std over the seeds of get(run) | ... | (one cell per gamma)."""
  cells = []
  for g in gammas:
    m, s = _mean_std([get(all_results[(g, seed)]) for seed in seeds])
    cells.append(f"{m:.{digits}f} ± {s:.{digits}f}")
  return f"| {label} | " + " | ".join(cells) + " |"


def _sample_sections(all_results, metric, gammas, seeds):
  """The metric by sampler setting, its per-seed difference to the first gamma, and precision/recall of the
  longest ancestral chain (DDIM's longest when no ancestral setting ran)."""
  keys = list(all_results[(gammas[0], seeds[0])]["samples"])
  fid = {key: (lambda r, k=key: r["samples"][k]["fid"]) for key in keys}
  lines = [f"## {metric} by sampler and number of steps", "", *_table_head("sampler / steps", gammas)]
  lines += [_mean_row(key, get, all_results, gammas, seeds, 2) for key, get in fid.items()]
  if len(gammas) > 1:
    lines += ["", f"## {metric} difference to gamma = {gammas[0]} with the same seed", "",
              "Mean ± std over seeds of the per-seed difference (negative: better than gamma = "
              f"{gammas[0]}), and in how many seeds it was better.", "", *_table_head("sampler / steps", gammas[1:])]
    lines += [f"| {key} | " + " | ".join(_paired_cell(all_results, get, g, gammas[0], seeds) for g in gammas[1:])
              + " |" for key, get in fid.items()]
  most_steps = ([k for k in keys if k.startswith("ancestral")] or keys)[-1]
  lines += ["", f"## Precision / recall ({most_steps} steps)", "", *_table_head("", gammas)]
  lines += [_mean_row(name, lambda r, n=name: r["samples"][most_steps][n], all_results, gammas, seeds, 3)
            for name in ("precision", "recall")]
  return lines


def _exposure_rows(all_results):
  """(label, get(run) -> number) of every exposure measure the runs have: the authors' (from noised data)
  first, then the chain's from t = T and from the intermediate start steps."""
  first = next(iter(all_results.values()))
  rows = []
  if all("exposure_authors" in r for r in all_results.values()):
    start = first["exposure_authors"]["reconstruction_start"]
    rows += [("one-step nu_t, mean over t = 0, 10, ... (authors')",
              lambda r: r["exposure_authors"]["nu_one_step_mean"]),
             (f"deterministic reconstruction L1 from t = {start} (authors')",
              lambda r: r["exposure_authors"]["reconstruction_l1"])]
  rows += [("sum of delta_t, chain from t = T", lambda r: r["exposure"]["delta_sum"]),
           ("mean nu_t gap (sampling - training), from t = T", lambda r: nu_gap(r["exposure"], r["exposure"])),
           ("chain reconstruction L1, from t = T", lambda r: r["exposure"]["chain_reconstruction_l1"])]
  for start, chain in first.get("exposure_from", {}).items():
    t0 = chain["t_original"][0]
    rows += [(f"sum of delta_t, chain from t = {t0}", lambda r, k=start: r["exposure_from"][k]["delta_sum"]),
             (f"mean nu_t gap, from t = {t0}", lambda r, k=start: nu_gap(r["exposure"], r["exposure_from"][k]))]
  return rows


def _exposure_sections(all_results, meta, gammas, seeds):
  rows = _exposure_rows(all_results)
  lines = [f"## Exposure bias (ancestral, respacing {meta['exposure_respacing']}, "
           f"{meta['exposure_images']} training images)", "", *_table_head("", gammas)]
  lines += [_mean_row(label, get, all_results, gammas, seeds, 4) for label, get in rows]
  if len(gammas) > 1:
    lines += ["", f"### Exposure measures: difference to gamma = {gammas[0]} with the same seed", "",
              "Mean ± std over seeds of the per-seed difference, and in how many seeds it was lower.", "",
              *_table_head("", gammas[1:])]
    lines += [f"| {label} | " + " | ".join(_paired_cell(all_results, get, g, gammas[0], seeds, fmt="+.4f",
                                                         word="lower") for g in gammas[1:]) + " |"
              for label, get in rows]
  return lines


def _plot_fid(plt, all_results, metric, gammas, seeds):
  """The metric against the number of steps, one line per sampler and gamma (mean ± std over the seeds)."""
  keys = list(all_results[(gammas[0], seeds[0])]["samples"])
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for sampler, style in (("ancestral", "-o"), ("ddim", "--s")):
    runs = [k for k in keys if k.startswith(sampler + "/")]
    steps = [int(k.split("/")[1].replace("ddim", "")) for k in runs]
    for i, g in enumerate(gammas):
      stats = [_mean_std([all_results[(g, s)]["samples"][k]["fid"] for s in seeds]) for k in runs]
      if stats:
        ax.errorbar(steps, [m for m, _ in stats], yerr=[s for _, s in stats], fmt=style, color=f"C{i}",
                    capsize=3, label=f"{sampler}, gamma = {g}")
  ax.set(xscale="log", xlabel="sampling steps", ylabel=metric, title=f"{metric} (mean ± std over seeds)")
  ax.legend(fontsize=7, ncol=2)
  return fig


def _plot_exposure(plt, all_results, gammas, seeds):
  """The authors' one-step nu_t (where the runs have it), the chain's nu_t and delta_t, and delta_t of each
  chain from an intermediate step; one colour per gamma, seeds averaged."""
  first = all_results[(gammas[0], seeds[0])]
  starts = list(first.get("exposure_from", {}))
  authors = all("exposure_authors" in r for r in all_results.values())
  fig, axes = plt.subplots(1, authors + 2 + len(starts), figsize=(5 * (authors + 2 + len(starts)), 4))
  if authors:
    for i, g in enumerate(gammas):
      one = [all_results[(g, s)]["exposure_authors"] for s in seeds]
      axes[0].plot(one[0]["nu_one_step_t"], np.mean([o["nu_one_step"] for o in one], 0), color=f"C{i}",
                   label=f"gamma {g}")
    axes[0].set(xlabel="t", ylabel="std over the batch of pred x0 - x0",
                title="one-step nu_t from q_sample(x0, t) (authors')")
    axes = axes[1:]
  for i, g in enumerate(gammas):
    color = f"C{i}"
    ex = [all_results[(g, s)]["exposure"] for s in seeds]
    t = ex[0]["t_original"]
    axes[0].plot(t, np.mean([e["nu_sampling"] for e in ex], 0), color=color, label=f"gamma {g}: sampling")
    axes[0].plot(t, np.mean([e["nu_training"] for e in ex], 0), "--", color=color, label=f"gamma {g}: training")
    axes[1].plot(t, np.mean([e["delta"] for e in ex], 0), color=color, label=f"gamma {g}")
    for ax, start in zip(axes[2:], starts):
      chains = [all_results[(g, s)]["exposure_from"][start] for s in seeds]
      ax.plot(chains[0]["t_original"], np.mean([c["delta"] for c in chains], 0), color=color, label=f"gamma {g}")
      ax.set(xlabel="t", ylabel="delta_t", title=f"delta_t, chain from t = {chains[0]['t_original'][0]}")
  axes[0].set(xlabel="t", ylabel="RMS(pred x0 - x0)", title="prediction error nu_t, chain from t = T")
  axes[1].set(xlabel="t", ylabel="delta_t", title="delta_t = (spread - sqrt(1 - abar))^2, from t = T")
  for ax in fig.axes:
    ax.invert_xaxis()
    ax.legend(fontsize=7)
  return fig


def write_report(all_results, docs, meta, gammas, seeds):
  """README.md with the tables (mean ± std over seeds) and two plots. `meta`: the study's settings (command,
  dataset, extractor, exposure_respacing, exposure_images), as recorded in results.json."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  first = all_results[(gammas[0], seeds[0])]
  metric = METRIC_NAMES.get(meta["extractor"], f"FID ({meta['extractor']} features)")
  minutes = sum(r["total_seconds"] for r in all_results.values()) / 60
  lines = [f"# Reproduction study: ADM vs ADM-IP on {meta['dataset']}", "",
           "Produced by (one command):", "", "```", meta["command"], "```", "",
           f"Seeds: {', '.join(map(str, seeds))}. Numbers are mean ± standard deviation over the seeds. "
           f"\"{metric}\" is {METRIC_HELP.get(meta['extractor'], 'the Fréchet distance')}, against the "
           "reference statistics of the training set; lower is better. Samples use the EMA parameters. Each run "
           f"trained {first['step']} steps.", "",
           *_sample_sections(all_results, metric, gammas, seeds), "",
           *_exposure_sections(all_results, meta, gammas, seeds),
           "", f"Total time: {minutes:.0f} minutes on {meta['machine']}.", "", f"![{metric}](fid.png)", "",
           "![exposure bias](exposure.png)", ""]
  for name, fig in (("fid.png", _plot_fid(plt, all_results, metric, gammas, seeds)),
                    ("exposure.png", _plot_exposure(plt, all_results, gammas, seeds))):
    fig.tight_layout()
    fileio.save_figure(fig, fileio.join(docs, name), dpi=100)
    plt.close(fig)
  notes = fileio.join(docs, "notes.md")  # hand-written reading of the numbers, kept across reruns
  if fileio.exists(notes):
    lines += ["", fileio.read_text(notes)]
  fileio.write_text(fileio.join(docs, "README.md"), "\n".join(lines))


def save_results(path, meta, all_results):
  runs = {f"gamma{g:g}_seed{s}": r for (g, s), r in all_results.items()}
  fileio.write_text(path, json.dumps({"meta": meta, "runs": runs}, indent=1))


def load_results(path):
  """(meta, {(gamma, seed): results}, gammas, seeds) from a results.json; seeds are those every gamma has."""
  data = fileio.load_json_checked(path, "the study's results", dict)
  if "meta" not in data or "runs" not in data:
    raise ValueError(f"{path}: expected {{'meta': ..., 'runs': ...}} as written by run_study")
  all_results = {}
  for key, r in data["runs"].items():
    gamma, seed = key[len("gamma"):].split("_seed")
    all_results[(float(gamma), int(seed))] = r
  gammas = sorted({g for g, _ in all_results})
  seeds = sorted(s for s in {s for _, s in all_results} if all((g, s) in all_results for g in gammas))
  return data["meta"], all_results, gammas, seeds


def _check_counts(gammas, seeds, ancestral_steps, ddim_steps, num_samples, per_device_batch, exposure_images):
  """ValueError naming the flag for an empty, repeated or impossible study setting (study.py's flags)."""
  for flag, values in (("--gammas", gammas), ("--seeds", seeds)):
    if not values:
      raise ValueError(f"{flag} is empty: the study needs at least one value.")
    if len(set(values)) != len(values):
      raise ValueError(f"{flag} {list(values)} repeats a value.")
  if not list(ancestral_steps) + list(ddim_steps):
    raise ValueError("--ancestral_steps and --ddim_steps are both empty: nothing to sample.")
  bad = [s for s in [*ancestral_steps, *ddim_steps] if s < 1]
  if bad:
    raise ValueError(f"--ancestral_steps/--ddim_steps {bad}: step counts must be >= 1.")
  for flag, value, low in (("--num_samples", num_samples, scoring.MIN_SAMPLES), ("--sample_batch", per_device_batch, 1),
                           ("--exposure_images", exposure_images, 1)):
    if value < low:
      why = " (precision/recall take each sample's 3rd nearest neighbour)" if flag == "--num_samples" else ""
      raise ValueError(f"{flag}={value} must be >= {low}{why}.")


def _check_settings(base, gammas, seeds, ancestral_steps, ddim_steps, exposure_respacing, exposure_start_steps):
  """Fails at start (not after the first training run) on respacings the config's diffusion cannot take."""
  config_validation.validate_config(base, num_devices=jax.device_count())
  for gamma in gammas:  # every run's config, up front, not when its turn comes
    config = base.copy_and_resolve_references()
    config.unlock()
    config.diffusion.input_perturbation = gamma
    try:
      config_validation.validate_config(config, num_devices=jax.device_count())
    except config_validation.ConfigError as e:
      raise ValueError(f"--gammas: {gamma:g}: {e}") from None
  for seed in seeds:
    config_validation.check_seed(seed, "--seeds")
  make = lambda respacing: diffusion_lib.create_diffusion(base.diffusion, learn_sigma=base.model.learn_sigma,
                                                          timestep_respacing=respacing)
  for respacing in [str(s) for s in ancestral_steps] + [f"ddim{s}" for s in ddim_steps]:
    make(respacing)  # raises on a respacing the diffusion cannot take
  num_steps = make(exposure_respacing).num_timesteps
  bad = [s for s in exposure_start_steps if not 0 <= s < num_steps]
  if bad:
    raise ValueError(f"--exposure_start_steps {bad} outside [0, {num_steps}) of --exposure_respacing="
                     f"{exposure_respacing}")


def run_study(base, *, workdir, docs, gammas, seeds, extractor, ancestral_steps, ddim_steps, num_samples,
              per_device_batch, exposure_start_steps=(), exposure_respacing="100", exposure_images=256, command=""):
  """Every (gamma, seed) run of `base`, seed-major, then the report in `docs`; returns {(gamma, seed): results}.

  Runs, samples and the reference statistics already in `workdir` are reused (training resumes, sample
  directories are completed), so an interrupted study picks up where it stopped.
  """
  _check_counts(gammas, seeds, ancestral_steps, ddim_steps, num_samples, per_device_batch, exposure_images)
  _check_settings(base, gammas, seeds, ancestral_steps, ddim_steps, exposure_respacing, exposure_start_steps)
  scoring.check_extractor_fits(extractor, base)
  fileio.makedirs(docs)
  reference = scoring.load_or_compute_reference(fileio.join(workdir, f"reference_{extractor.name}.npz"),
                                                     base, extractor)
  x0 = images_lib.to_model_range(
      input_pipeline.load_images(base.data, base.model.image_size, max_images=exposure_images))
  meta = dict(command=command, dataset=base.data.dataset, extractor=extractor.name,
              exposure_respacing=exposure_respacing, exposure_images=int(x0.shape[0]),
              machine=f"{os.cpu_count()} CPU cores, {jax.device_count()} x {jax.devices()[0].device_kind}")
  all_results = {}
  results_path = fileio.join(docs, "results.json")
  with interrupts.watch():  # Ctrl-C / SIGTERM: stop after the training, batch or measurement in progress
    for seed in seeds:  # seed-major: after each round every gamma has the same number of seeds
      for gamma in gammas:
        config = base.copy_and_resolve_references()
        config.unlock()
        config.diffusion.input_perturbation = gamma
        config.seed = seed
        run_dir = fileio.join(workdir, f"gamma{gamma:g}_seed{seed}")
        logging.info("=== gamma %g, seed %d -> %s", gamma, seed, run_dir)
        kept = (f"{len(all_results)} of {len(gammas) * len(seeds)} runs complete in {results_path}, the rest "
                f"resume from what {workdir} holds; run the same command again to resume")
        interrupts.note(kept)
        results = run_one(
            config, run_dir, extractor=extractor, reference=reference, x0_real=x0, ancestral_steps=ancestral_steps,
            ddim_steps=ddim_steps, num_samples=num_samples, per_device_batch=per_device_batch,
            exposure_start_steps=exposure_start_steps, exposure_respacing=exposure_respacing, kept=kept)
        exposure.check_finite(results, f"the study run {run_dir}", results_path)
        all_results[(gamma, seed)] = results
        save_results(results_path, meta, all_results)
      # The report so far (all gammas, the seeds done), rewritten after every round of seeds.
      write_report(all_results, docs, meta, gammas, seeds[:seeds.index(seed) + 1])
  logging.info("Wrote %s/README.md", docs)
  return all_results
