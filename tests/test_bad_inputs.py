"""Every command answers bad input with one FATAL line, exit code 1 and no traceback, before it samples or trains;
non-finite weights and samples are never written.

The commands run as subprocesses (three at a time) against a copy of the session's toy training run (conftest's
`toy_run`: configs/test.py, 8x8x1), a converted 16x16 model with random weights (the digits classifier's size), one
with NaN weights, and files made broken on purpose."""
import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest

from helpers import REFERENCE_DIR, TOY_TRAIN_ARGS, assert_one_fatal_line, load_config, run_commands_in_parallel
from ddpm_ip_jax import models
from ddpm_ip_jax import workdir as workdir_lib
from ddpm_ip_jax.evaluation import digits
from ddpm_ip_jax.evaluation import digits_training
from ddpm_ip_jax.evaluation import metrics
from ddpm_ip_jax.evaluation import scoring

pytestmark = pytest.mark.slow  # about 35 command-line runs

_HAS_TORCH = importlib.util.find_spec("torch") is not None  # the .pt reader needs it (Python 3.11's CPU build)

# name -> (command module and arguments with {d} for the fixture directory, expected text of the FATAL line)
CASES = {
    "sample: more steps than the diffusion": (
        ["sample", "--workdir={d}/run", "--steps=2000"], "--steps='2000': respacing '2000': cannot take 2000"),
    "sample: ddim0": (["sample", "--workdir={d}/run", "--steps=ddim0"], "cannot get exactly 0 steps"),
    "sample: eta above 1": (["sample", "--workdir={d}/run", "--sampler=ddim", "--steps=ddim5", "--eta=5"],
                            "--eta=5 must be in [0, 1]"),
    "sample: eta below 0": (["sample", "--workdir={d}/run", "--eta=-0.5"], "--eta=-0.5 must be in [0, 1]"),
    "sample: no samples": (["sample", "--workdir={d}/run", "--num_samples=0"], "--num_samples must be >= 1"),
    "sample: workdir is a file": (["sample", "--workdir={d}/afile"], "afile/config.json not found"),
    "sample: workdir missing": (["sample", "--workdir={d}/nowhere"], "nowhere/config.json not found"),
    "sample: no model given": (["sample"], "give --workdir (a training run) or --checkpoint"),
    "sample: output not writable": (["sample", "--workdir={d}/run", "--num_samples=2", "--output_dir={d}/afile/x"],
                                    "--output_dir {d}/afile/x cannot be written"),
    "sample: eps_scale not two numbers": (["sample", "--workdir={d}/run", "--eps_scale=1"], "--eps_scale wants 'k,b'"),
    "sample: non-finite samples": (["sample", "--checkpoint={d}/nan16", "--num_samples=2", "--batch_size=1",
                                    "--steps=2", "--output_dir={d}/nan_samples"], "came out NaN/Inf"),
    "evaluate: one sample": (["evaluate", "--checkpoint={d}/model16", "--extractor=digits", "--weights={d}/dc.npz",
                              "--reference={d}/ref.npz", "--num_samples=3"], "need at least 4 samples"),
    "evaluate: extractor does not fit": (["evaluate", "--workdir={d}/run", "--extractor=digits",
                                          "--weights={d}/dc.npz", "--reference={d}/r.npz", "--num_samples=4"],
                                         "takes 16x16 images, the model makes 8x8"),
    "evaluate: reference of another extractor": (
        ["evaluate", "--checkpoint={d}/model16", "--extractor=digits", "--weights={d}/dc.npz",
         "--reference={d}/ref7.npz", "--num_samples=4"], "have 7-dimensional features, the digits extractor gives 64"),
    "evaluate: weights missing": (["evaluate", "--checkpoint={d}/model16", "--extractor=digits",
                                   "--weights={d}/none.npz", "--reference={d}/r.npz"], "none.npz not found"),
    "evaluate: no reference flag": (["evaluate", "--checkpoint={d}/model16", "--weights={d}/dc.npz"],
                                    "--reference is required"),
    "exposure_bias: no images": (["exposure_bias", "--workdir={d}/run", "--num_images=0"],
                                 "--num_images=0: 0 is not a positive integer"),
    "exposure_bias: start step outside": (["exposure_bias", "--workdir={d}/run", "--steps=5", "--start_step=99"],
                                          "start_step 99 outside [0, 5)"),
    "exposure_bias: output not writable": (["exposure_bias", "--workdir={d}/run", "--output={d}/afile/x"],
                                           "--output {d}/afile cannot be written"),
    "study: negative gamma": (["study", "--config=configs/test.py", "--workdir={d}/study", "--docs={d}/docs",
                               "--gammas=0,-0.1", "--ancestral_steps=5", "--ddim_steps=5",
                               "--exposure_respacing=5", "--exposure_start_steps=4", "--weights={d}/dc.npz"],
                              "--gammas: -0.1: config.diffusion.input_perturbation (gamma)=-0.1 must be"),
    "study: config missing": (["study", "--config=configs/nope.py"], "--config=configs/nope.py: no such file"),
    "convert: .pt that is not a checkpoint": (
        ["convert", "--input={d}/garbage.pt", "--output={d}/c1", f"--flags_file={REFERENCE_DIR}/unet_config.json"],
        "garbage.pt cannot be read as a PyTorch checkpoint" if _HAS_TORCH else "garbage.pt needs torch"),
    "convert: flag of the wrong type": (["convert", "--input={d}/x.npz", "--output={d}/c2",
                                         '--flags={{"num_channels": "abc"}}'], "num_channels='abc' must be an integer"),
    "convert: flags not JSON": (["convert", "--input={d}/x.npz", "--output={d}/c3", "--flags={{num_channels"],
                                "--flags is not JSON"),
    "convert: NaN weights": (["convert", "--input={d}/nan_state_dict.npz", "--output={d}/c4",
                              f"--flags_file={REFERENCE_DIR}/unet_config.json"], "holds NaN/Inf in 1 tensor(s)"),
    "convert: missing input": (["convert", "--input={d}/none.pt", "--output={d}/c5", "--flags={{}}"],
                               "checkpoint file not found"),
    "convert: empty input": (["convert", "--input=", "--output={d}/c10", "--flags={{}}"],
                             "--input is empty (--input= with nothing after it"),
    "convert: flags file a directory": (["convert", "--input={d}/x.npz", "--output={d}/c11", "--flags_file={d}"],
                                        "--flags_file {d} is a directory, not a JSON file."),
    "digits_classifier: no epochs": (["evaluation.digits_classifier", "--epochs=0", "--output={d}/dc2.npz"],
                                     "--epochs=0: 0 is not a positive integer"),
    "digits_classifier: output not writable": (["evaluation.digits_classifier", "--output={d}/afile/dc.npz"],
                                               "--output {d}/afile cannot be written"),
    "main: config missing": (["main", "--config=configs/nope.py", "--workdir={d}/m"], "no such file"),
    "main: no --config": (["main", "--workdir={d}/m"], "Flag --config must have a value other than None"),
    "benchmark: no --config": (["benchmark"], "Flag --config must have a value other than None"),
    "main: workdir is a file": (["main", *TOY_TRAIN_ARGS, "--workdir={d}/afile"], "is a file; give a directory"),
    "main: eta in the config": (["main", *TOY_TRAIN_ARGS, "--workdir={d}/m", "--config.sampling.eta=5"],
                                "config.sampling.eta=5.0 must be in [0, 1]"),
    "main: grid respacing ddim999": (["main", *TOY_TRAIN_ARGS, "--workdir={d}/m",
                                      "--config.training.grid_sampling_steps=ddim999"], "is not a respacing of 10"),
    "main: npz labels of another length": (["main", *TOY_TRAIN_ARGS, "--workdir={d}/m", "--config.data.dataset=npz",
                                            "--config.data.data_dir={d}/labels_short.npz"],
                                           "arr_1 (the labels) must be integers [N] with N = 8"),
    "main: labels beyond num_classes": (["main", *TOY_TRAIN_ARGS, "--workdir={d}/m", "--config.data.dataset=npz",
                                         "--config.data.data_dir={d}/labels.npz", "--config.model.num_classes=2"],
                                        "run from 0 to 4, outside [0, num_classes=2): set config.model.num_classes=5"),
    "main: npz of zero-size images": (["main", *TOY_TRAIN_ARGS, "--workdir={d}/m", "--config.data.dataset=npz",
                                       "--config.data.data_dir={d}/empty_images.npz"],
                                      "with C in (1, 3) and N, H, W > 0, got uint8 (4, 0, 0, 1)"),
    "main: negative labels": (["main", *TOY_TRAIN_ARGS, "--workdir={d}/m", "--config.data.dataset=npz",
                               "--config.data.data_dir={d}/labels_negative.npz", "--config.model.num_classes=2"],
                              "include -1: class labels are 0 .. K-1"),
    "main: a corrupt image in a folder": (["main", *TOY_TRAIN_ARGS, "--workdir={d}/m",
                                           "--config.data.dataset=folder", "--config.data.data_dir={d}/folder"],
                                          "are not readable images, e.g. {d}/folder/b_broken.png"),
    # Checked before any work (issue list of a new user's faults): values that pass a type check but cannot work.
    "main: no EMA rate": (["main", *TOY_TRAIN_ARGS, "--workdir={d}/m", "--config.training.ema_rates=()"],
                          "config.training.ema_rates=() must be one or more distinct numbers"),
    "main: infinite learning rate": (["main", *TOY_TRAIN_ARGS, "--workdir={d}/m",
                                      "--config.training.learning_rate=inf"], "learning_rate=inf must be a finite"),
    "main: infinite gamma": (["main", *TOY_TRAIN_ARGS, "--workdir={d}/m",
                              "--config.diffusion.input_perturbation=inf"], "(gamma)=inf must be a finite number"),
    "main: seed beyond 64 bits": (["main", *TOY_TRAIN_ARGS, "--workdir={d}/m", f"--config.seed={2**64}"],
                                  "must be an integer in [0, 2**63 - 1]"),
    "main: s3 workdir": (["main", *TOY_TRAIN_ARGS, "--workdir=s3://bucket/run"],
                         "--workdir=s3://bucket/run: s3:// is not supported"),
    "main: file URL": (["main", *TOY_TRAIN_ARGS, "--workdir=file:///tmp/run"],
                       "--workdir=file:///tmp/run: give the local path itself (/tmp/run)"),
    "sample: gs URL without a bucket": (["sample", "--workdir=gs:///run"], "--workdir=gs:///run: no bucket"),
    "sample: eps_scale zero": (["sample", "--workdir={d}/run", "--eps_scale=0,0"],
                               "--eps_scale=0,0: lambda_t = k t + b must be positive at every step"),
    "sample: eps_scale negative at the end": (["sample", "--workdir={d}/run", "--eps_scale=-1,1.01", "--steps=5"],
                                              "it is 1.01 at t = 0 and -2.99 at t = 4"),
    "evaluate: negative num_reference": (["evaluate", "--checkpoint={d}/model16", "--extractor=digits",
                                          "--weights={d}/dc.npz", "--reference={d}/r.npz", "--num_reference=-1"],
                                         "--num_reference=-1 must be >= 0"),
    "evaluate: reference with NaN": (["evaluate", "--checkpoint={d}/model16", "--extractor=digits",
                                      "--weights={d}/dc.npz", "--reference={d}/ref_nan.npz", "--num_samples=4"],
                                     "ref_nan.npz hold NaN/Inf in mu"),
    "evaluate: reference with too few features": (
        ["evaluate", "--checkpoint={d}/model16", "--extractor=digits", "--weights={d}/dc.npz",
         "--reference={d}/ref_few.npz", "--num_samples=4"], "ref_few.npz hold 2 feature vectors"),
    "evaluate: reference sigma of the wrong shape": (
        ["evaluate", "--checkpoint={d}/model16", "--extractor=digits", "--weights={d}/dc.npz",
         "--reference={d}/ref_sigma.npz", "--num_samples=4"], "ref_sigma.npz are inconsistent: mu (64,), sigma (3, 3)"),
    "convert: unknown noise schedule": (
        ["convert", "--input={d}/x.npz", "--output={d}/c6", '--flags={{"noise_schedule": "cosin"}}'],
        "noise_schedule='cosin' is not one of 'linear', 'cosine'. (reference flag 'noise_schedule')"),
    "convert: no diffusion steps": (
        ["convert", "--input={d}/x.npz", "--output={d}/c7", '--flags={{"diffusion_steps": 0}}'],
        "config.diffusion.steps=0 must be an integer >= 1"),
    "convert: impossible respacing": (
        ["convert", "--input={d}/x.npz", "--output={d}/c8", '--flags={{"timestep_respacing": "5000"}}'],
        "timestep_respacing='5000' is not a respacing of 1000 steps"),
    "convert: export under a .pt name": (["convert", "--export", "--input={d}/model16", "--output={d}/c9.pt"],
                                         "--export writes an .npz archive"),
    "study: no gammas": (["study", *TOY_TRAIN_ARGS, "--workdir={d}/study", "--docs={d}/docs", "--gammas=",
                          "--weights={d}/dc.npz"], "--gammas is empty"),
    "benchmark: sample steps the diffusion cannot take": (["benchmark", "--config=configs/test.py"],
                                                           "--sample_steps='100' is not a respacing of 10 steps"),
    "study: no seeds": (["study", *TOY_TRAIN_ARGS, "--workdir={d}/study", "--docs={d}/docs", "--seeds=",
                         "--weights={d}/dc.npz"], "--seeds is empty"),
    "study: one sample": (["study", *TOY_TRAIN_ARGS, "--workdir={d}/study", "--docs={d}/docs", "--num_samples=1",
                           "--weights={d}/dc.npz"], "--num_samples=1 must be >= 4"),
    "study: no sample batch": (["study", *TOY_TRAIN_ARGS, "--workdir={d}/study", "--docs={d}/docs",
                                "--sample_batch=0", "--weights={d}/dc.npz"], "--sample_batch=0 must be >= 1"),
}


def _fixtures(d, toy_run):
  """The runs, models and broken files the cases point at, under `d` (`d`/run a copy of the session's toy run)."""
  shutil.copytree(toy_run, d / "run")
  config = load_config("test")
  config.model.image_size, config.model.channel_mult = 16, (1, 2)
  params = models.init_params(models.create_model(config), jax.random.key(0))
  workdir_lib.save_converted(config, params, d / "model16")
  workdir_lib.save_converted(config, jax.tree.map(lambda p: p * np.nan, params), d / "nan16")
  digits_training.save_params(
      digits.DigitsNet().init(jax.random.key(0), np.zeros((1, 16, 16, 1), np.uint8))["params"],
      str(d / "dc.npz"), accuracy=0.0, seed=0, epochs=0)
  save_stats = lambda name, **arrays: scoring.save_reference_statistics(metrics.ReferenceStatistics(**arrays),
                                                                        str(d / name))
  save_stats("ref7.npz", mu=np.zeros(7), sigma=np.eye(7), features=np.zeros((3, 7)))
  good = dict(mu=np.zeros(64), sigma=np.eye(64), features=np.zeros((8, 64)))
  save_stats("ref_nan.npz", **{**good, "mu": np.full(64, np.nan)})
  save_stats("ref_few.npz", **{**good, "features": np.zeros((2, 64))})
  save_stats("ref_sigma.npz", **{**good, "sigma": np.eye(3)})
  (d / "run_events.txt").write_text("\n".join(sorted(p.name for p in (d / "run").glob("events.out.tfevents*"))))
  (d / "afile").write_text("a file, not a directory")
  (d / "nan_samples").mkdir()  # an output folder the user made
  (d / "garbage.pt").write_bytes(os.urandom(1000))
  state = dict(np.load(REFERENCE_DIR / "unet_state_dict.npz"))
  np.savez(d / "x.npz", **state)
  name = sorted(state)[0]
  state[name] = state[name].copy()
  state[name].flat[0] = np.nan
  np.savez(d / "nan_state_dict.npz", **state)
  images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
  np.savez(d / "labels_short.npz", images, np.zeros(5, np.int64))
  np.savez(d / "labels.npz", images, np.arange(8) % 5)
  np.savez(d / "labels_negative.npz", images, np.full(8, -1))
  np.savez(d / "empty_images.npz", np.zeros((4, 0, 0, 1), np.uint8))
  (d / "folder").mkdir()
  from PIL import Image  # pylint: disable=import-outside-toplevel
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "folder" / "a_good.png")
  (d / "folder" / "b_broken.png").write_bytes(b"not a png at all")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, toy_run):
  d = tmp_path_factory.mktemp("bad_inputs")
  _fixtures(d, toy_run)
  return d, run_commands_in_parallel({name: [a.format(d=d) for a in args] for name, (args, _) in CASES.items()})


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_fatal_line(outcomes, case):
  d, procs = outcomes
  proc = procs[case]
  assert_one_fatal_line(proc, CASES[case][1].format(d=d))
  assert "Compiling" not in proc.stderr and "Training steps" not in proc.stderr
  assert not proc.stdout.strip()  # the benchmark printed no measurement before it failed


def test_nothing_is_written_for_non_finite_samples_or_weights(outcomes):
  d, _ = outcomes
  # The failed evaluations and samplings of the training run left no TensorBoard events file in it.
  events = sorted(p.name for p in (d / "run").glob("events.out.tfevents*"))
  assert "\n".join(events) == (d / "run_events.txt").read_text()
  assert not any((d / name).exists() for name in ("c9.pt", "c10", "c11", "study"))
  assert os.listdir(d / "nan_samples") == []  # the user's folder as it was: no sampling.json, parts or lock
  assert not (d / "c4").exists()
  assert json.loads((d / "model16" / "config.json").read_text())["model"]["image_size"] == 16


HELP_COMMANDS = ("main", "sample", "evaluate", "exposure_bias", "study", "convert", "benchmark",
                 "evaluation.digits_classifier")


def test_every_command_prints_its_help():
  """`--help` lists the flags and exits without a traceback (it once raised config_flags' UnparsedFlagError: the
  check of the config file read the flag's parsed value before absl had parsed it)."""
  procs = run_commands_in_parallel({name: [name, "--help"] for name in HELP_COMMANDS})
  for name, proc in procs.items():
    assert proc.returncode in (0, 1), (name, proc.stderr[-3000:])  # absl exits 1 after its help
    assert "Traceback" not in proc.stderr + proc.stdout, (name, proc.stderr[-3000:])
    assert "--" in proc.stdout and "FATAL" not in proc.stderr, name
