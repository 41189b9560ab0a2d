"""The training step and state: device-count invariance, per-device noise, DDPM-IP's network input and
target, resume == uninterrupted, checkpoints, config validation.

Runs on the 2 simulated CPU devices of conftest.py, with a tiny UNet (8x8x1, 32 channels) or a one-parameter
model that records what it is fed.
"""
import shutil

from flax import jax_utils
import flax.linen as nn
import jax
from jax import lax
import numpy as np
import pytest

from helpers import compiles_logged
from helpers import load_config
from helpers import step_compiles
from ddpm_ip_jax import checkpointing
from ddpm_ip_jax import config_validation
from ddpm_ip_jax import host_memory
from ddpm_ip_jax import input_pipeline
from ddpm_ip_jax import models
from ddpm_ip_jax import objective
from ddpm_ip_jax import train_state
from ddpm_ip_jax import train_step
from ddpm_ip_jax.models.unet import HostInit

IMAGE_SHAPE = (8, 8, 1)


def tiny_config(**training):
  """configs/test.py (8x8x1, one level, 32 channels) with 4 diffusion steps, two EMA rates and batch 4."""
  config = load_config("test")
  config.diffusion.steps = 4            # 4 steps x 10 losses: the second-moment sampler warms up quickly
  config.training.ema_rates = (0.9, 0.5)
  config.training.batch_size = 4
  for k, v in training.items():
    config.training[k] = v
  return config


def setup(config):
  """The training of `config` as the loop builds it (`train_step.create_training`: fresh state, pmapped step, its
  noise key) and the settings of its step."""
  training = train_step.create_training(config)
  return training, train_step.StepSettings.from_config(config, training.model, training.diffusion)


def draw(train_rng, step, device, sampler_state, shape, settings):
  """The noise the training step draws at `step` on `device`."""
  return objective.draw_step_noise(objective.step_key(train_rng, step, device), sampler_state, shape,
                                   settings.perturbation, settings.diff.num_timesteps)


def global_batch(step, batch_size=4):
  """A deterministic batch per step: float32 images [batch, 8, 8, 1] in [-1, 1]."""
  rng = np.random.default_rng(step)
  return {"image": rng.uniform(-1, 1, (batch_size, *IMAGE_SHAPE)).astype(np.float32),
          "label": rng.integers(0, 10, (batch_size,)).astype(np.int32)}


def shard(tree, num_devices):
  """[B, ...] -> [num_devices, B / num_devices, ...]."""
  return jax.tree.map(lambda x: x.reshape(num_devices, -1, *x.shape[1:]), tree)


def replicate(tree, num_devices):
  return jax_utils.replicate(tree, devices=jax.local_devices()[:num_devices])


def unreplicate(tree):
  return jax.device_get(jax.tree.map(lambda x: x[0], tree))


def _numbers(x):
  """An array leaf as numpy; a key array as its key data."""
  return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(_numbers(x), _numbers(y), rtol=rtol, atol=atol)


def test_two_devices_equal_one_device_with_the_same_noise():
  assert jax.local_device_count() == 2
  config = tiny_config()
  # Adam divides by sqrt(v) + eps: with the default eps 1e-8 it turns round-off in gradients that are
  # exactly 0 in exact arithmetic (behind the zero-initialised layers) into +-lr steps. A larger eps keeps
  # the comparison at float tolerance without changing what is compared.
  config.training.adam_eps = 1e-4
  training, settings = setup(config)
  state0, train_rng = training.state, training.train_rng
  p_draw = jax.pmap(
      lambda step, sampler_state: draw(train_rng, step, lax.axis_index("batch"), sampler_state,
                                       (2, *IMAGE_SHAPE), settings),
      axis_name="batch", in_axes=(None, 0))
  step_fn = {n: jax.pmap(train_step.make_train_step(settings), axis_name="batch",
                         devices=jax.local_devices()[:n]) for n in (1, 2)}
  states = {n: replicate(state0, n) for n in (1, 2)}
  for step in range(3):
    # The noise the 2 devices draw, [2, 2, ...], is given to 1 device as one batch of 4.
    noise2 = jax.device_get(p_draw(step, replicate(state0.sampler_state, 2)))
    noise1 = noise2.replace(
        t=noise2.t.reshape(1, 4), weights=noise2.weights.reshape(1, 4),
        eps=noise2.eps.reshape(1, 4, *IMAGE_SHAPE), xi=noise2.xi.reshape(1, 4, *IMAGE_SHAPE),
        gamma=noise2.gamma.reshape(1, 4),
        dropout_rng=noise2.dropout_rng[:1])  # no dropout in the tiny model
    batch = global_batch(step)
    metrics = {}
    for n, noise in ((2, noise2), (1, noise1)):
      states[n], metrics[n] = step_fn[n](states[n], shard(batch, n), noise)
    assert_trees_close(unreplicate(metrics[2]), unreplicate(metrics[1]), rtol=1e-4)
  s1, s2 = unreplicate(states[1]), unreplicate(states[2])
  assert int(s1.step) == int(s2.step) == 3
  assert_trees_close(s2.params, s1.params, rtol=1e-4, atol=1e-6)
  assert_trees_close(s2.ema_params, s1.ema_params, rtol=1e-4, atol=1e-6)
  assert_trees_close(s2.opt_state, s1.opt_state, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(s2.sampler_state.counts, s1.sampler_state.counts)
  assert_trees_close(s2.sampler_state.history, s1.sampler_state.history, rtol=1e-4)
  # Training moved the parameters, and the EMA at rate r is r * init + (1 - r) * params after one
  # step, so after 3 steps the faster EMA (0.5) is closer to the parameters than the slower (0.9).
  p0, p = jax.tree.leaves(state0.params), jax.tree.leaves(s2.params)
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(p0, p)) > 1e-4
  dist = {k: sum(float(np.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(e), p))
          for k, e in s2.ema_params.items()}
  assert dist["0.5"] < dist["0.9"]


class RecordingModel(nn.Module):
  """out = scale * x (one parameter); during training it hands (device, x, t) to `record`."""
  record: callable
  image_size: int = 8      # the fields models.init_params reads
  in_channels: int = 1
  num_classes: int = 0
  scale_init: HostInit = HostInit("constant", 0.5)  # models.init_params draws each parameter by its module's one

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    scale = self.param("scale", self.scale_init, ())
    if train:
      jax.debug.callback(self.record, lax.axis_index("batch"), x, t)
    return scale * x


@pytest.mark.parametrize("kind", ["constant", "linear", "uniform"])
def test_one_step_feeds_the_perturbed_input_and_regresses_onto_eps(kind, monkeypatch):
  """The paper's constant gamma, and the variants with one gamma per example (diffusion.perturbation_gamma)."""
  config = tiny_config()
  config.model.learn_sigma = False
  config.diffusion.loss_type = "mse"
  config.diffusion.steps = 1000
  config.diffusion.input_perturbation = 0.3
  config.diffusion.input_perturbation_kind = kind
  config.diffusion.input_perturbation_start = 0.05
  n = min(jax.local_device_count(), 2)  # 2 simulated CPU devices in the suite; 1 on a one-GPU device check
  config.training.batch_size = 2 * n
  config_validation.validate_config(config, num_devices=n)
  seen = {}
  model = RecordingModel(record=lambda d, x, t: seen.__setitem__(int(d), (np.asarray(x), np.asarray(t))))
  monkeypatch.setattr(models, "create_model", lambda config: model)  # the builder's model is the recorder
  training, settings = setup(config)
  state0, diff = training.state, training.diffusion  # the recorder's one parameter is a constant: any init key
  # The test's own noise key: the uniform kind's gap between the two losses (asserted below) depends on the draw.
  train_rng = jax.random.key(3)
  p_step = train_step.make_p_train_steps(settings, train_rng)
  batch = global_batch(0, 2 * n)
  stacked = jax.tree.map(lambda x: x[:, None], shard(batch, n))  # [devices, 1 step, b, ...]
  state, metrics = p_step(replicate(state0, n), stacked)
  jax.effects_barrier()
  assert sorted(seen) == list(range(n))

  abar = np.asarray(diff.tables["alphas_cumprod"])
  expected_mse, eps_plus_xi_mse, draws = [], [], []
  for d in range(n):
    noise = draw(train_rng, 0, d, state0.sampler_state, (2, *IMAGE_SHAPE), settings)
    x0 = shard(batch, n)["image"][d]
    eps, xi, t = np.asarray(noise.eps), np.asarray(noise.xi), np.asarray(noise.t)
    a = abar[t][:, None, None, None]
    gamma = np.asarray(noise.gamma)[:, None, None, None]  # drawn by objective.draw_step_noise
    if kind == "constant":
      np.testing.assert_allclose(gamma, 0.3)
    elif kind == "linear":
      np.testing.assert_allclose(gamma[:, 0, 0, 0], 0.05 + 0.25 * t / 999, rtol=1e-6)
    else:
      assert np.all((0 <= gamma) & (gamma <= 0.3)) and len(np.unique(gamma)) == len(gamma)
    y_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * (eps + gamma * xi)  # docs/method.md section 1
    x_seen, t_seen = seen[d]
    np.testing.assert_array_equal(t_seen, t)
    np.testing.assert_allclose(x_seen, y_t, rtol=1e-5, atol=1e-6)
    expected_mse.append(np.mean((eps - 0.5 * y_t) ** 2, axis=(1, 2, 3)))
    eps_plus_xi_mse.append(np.mean((eps + gamma * xi - 0.5 * y_t) ** 2, axis=(1, 2, 3)))
    draws.append((t, eps, xi))
  # The two devices drew different noise; eps and xi are independent draws.
  if n == 2:
    assert not np.array_equal(draws[0][1], draws[1][1]) and not np.array_equal(draws[0][2], draws[1][2])
  assert not np.allclose(draws[0][1], draws[0][2])
  # The loss regresses onto eps (uniform sampler weights are 1 before warm-up).
  m = unreplicate(metrics)
  np.testing.assert_allclose(m["mse"] / m["count"], np.mean(expected_mse), rtol=1e-5)
  np.testing.assert_allclose(m["loss"], m["mse"], rtol=1e-6)
  assert abs(np.mean(eps_plus_xi_mse) - np.mean(expected_mse)) > 1e-3
  assert int(unreplicate(state).step) == 1


def test_devices_and_steps_draw_different_numbers_and_repeat_them():
  training, settings = setup(tiny_config())
  key = training.train_rng
  shape = (64, *IMAGE_SHAPE)
  sampler_state = training.state.sampler_state
  a = draw(key, 5, 0, sampler_state, shape, settings)
  b = draw(key, 5, 1, sampler_state, shape, settings)
  c = draw(key, 6, 0, sampler_state, shape, settings)
  again = draw(key, 5, 0, sampler_state, shape, settings)
  for other in (b, c):
    assert not np.array_equal(a.t, other.t)
    assert not np.array_equal(a.eps, other.eps) and not np.array_equal(a.xi, other.xi)
  assert_trees_close(a, again, rtol=0, atol=0)


def run_steps(p_step, state, steps, steps_per_call, batch_size):
  """Trains state (replicated on 2 devices) over `steps` with batches global_batch(step)."""
  for start in range(steps.start, steps.stop, steps_per_call):
    chunk = [shard(global_batch(s, batch_size), 2) for s in range(start, start + steps_per_call)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs, axis=1), *chunk)
    state, _ = p_step(state, stacked)
  return state


def test_resume_equals_uninterrupted_training(tmp_path):
  config = tiny_config(batch_size=8)
  training, _ = setup(config)
  state0, p_step = training.state, training.p_train_steps
  n = 6  # T = 4 steps x 10 losses: the loss-second-moment history fills up after ~6 steps of 8 examples

  # Uninterrupted: 2N steps.
  straight = unreplicate(run_steps(p_step, replicate(state0, 2), range(0, 2 * n), 1, 8))

  # N steps, checkpoint, a fresh process-like start (new init, restore), N more steps.
  manager = checkpointing.make_manager(str(tmp_path / "ckpt"), max_to_keep=2)
  first = run_steps(p_step, replicate(state0, 2), range(0, n), 1, 8)
  checkpointing.save(manager, n, unreplicate(first))
  manager.wait_until_finished()
  manager.close()
  del first
  fresh = setup(config)[0].state
  manager = checkpointing.make_manager(str(tmp_path / "ckpt"), max_to_keep=2)
  restored, step = checkpointing.restore_latest(manager, fresh)
  assert step == n and int(restored.step) == n
  resumed = unreplicate(run_steps(p_step, replicate(restored, 2), range(n, 2 * n), 1, 8))

  assert int(resumed.step) == int(straight.step) == 2 * n
  assert np.all(np.asarray(straight.sampler_state.counts) == 10)  # the history really was warmed up
  # The same compiled step on the same numbers: equal bit for bit.
  for part in ("params", "ema_params", "opt_state", "sampler_state"):
    assert_trees_close(getattr(resumed, part), getattr(straight, part), rtol=0, atol=0)


def test_several_steps_per_call_equal_one_step_per_call():
  config = tiny_config(batch_size=4)
  config.training.adam_eps = 1e-4  # see test_two_devices_equal_one_device_with_the_same_noise
  training, _ = setup(config)
  state0, p_step = training.state, training.p_train_steps
  scanned = unreplicate(run_steps(p_step, replicate(state0, 2), range(0, 2), 2, 4))
  single = unreplicate(run_steps(p_step, replicate(state0, 2), range(0, 2), 1, 4))
  assert int(scanned.step) == int(single.step) == 2
  for part in ("params", "ema_params", "opt_state", "sampler_state"):
    assert_trees_close(getattr(scanned, part), getattr(single, part), rtol=1e-4, atol=1e-6)


def test_replicate_state_lays_the_state_out_as_the_step_returns_it():
  """`train_state.replicate_state`: on both devices the values of flax's `jax_utils.replicate`, with the device
  layout of the step's own outputs (so the step's second call reuses the first one's program)."""
  training, _ = setup(tiny_config())
  state = train_state.replicate_state(training.state)
  copies = replicate(training.state, 2)
  assert jax.tree.structure(state) == jax.tree.structure(copies)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(copies)):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  stepped, _ = training.p_train_steps(state, jax.tree.map(lambda x: x[:, None], shard(global_batch(0), 2)))
  for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(stepped)):
    assert before.sharding == after.sharding, (before.sharding, after.sharding)
  assert int(unreplicate(stepped).step) == 1


def test_the_step_compiled_in_the_background_serves_the_first_call(monkeypatch):
  """What the training loop does at its start: the step compiled in a thread for `abstract_step_args` (before
  the state and the batches exist), then called with the state as `replicate_state` lays it out and a batch as
  `prefetch_to_device` puts it: the call neither traces nor compiles the step again, and steps."""
  traces = []
  draw_step_noise = objective.draw_step_noise

  def counted(*args, **kwargs):
    traces.append(1)
    return draw_step_noise(*args, **kwargs)

  monkeypatch.setattr(objective, "draw_step_noise", counted)
  config = tiny_config(batch_size=4)
  training, _ = setup(config)
  compiling = host_memory.BackgroundCompile(training.p_train_steps,
                                            *train_step.abstract_step_args(config, training.state, 1))
  state = train_state.replicate_state(training.state)
  batch = next(input_pipeline.prefetch_to_device(iter([jax.tree.map(lambda x: x[:, None],
                                                                    shard(global_batch(0), 2))])))
  compiling.wait()
  assert len(traces) == 1
  with compiles_logged() as seen:
    stepped, _ = training.p_train_steps(state, batch)
  assert len(traces) == 1
  assert not step_compiles(seen), seen
  assert int(unreplicate(stepped).step) == 1


@pytest.mark.parametrize("microbatch", [1, 2])
def test_micro_batches_equal_the_whole_batch(microbatch):
  """Micro-batches of 1 or 2 of the 4 images per device (a lax.scan summing their gradients) give the whole
  batch's step: parameters, EMA, optimizer and sampler state, and the metrics (the tiny model has no dropout,
  whose masks are drawn per micro-batch)."""
  results = {}
  for mb in (-1, microbatch):
    config = tiny_config(batch_size=8, microbatch=mb)
    config.training.adam_eps = 1e-4  # see test_two_devices_equal_one_device_with_the_same_noise
    training, settings = setup(config)
    assert settings.microbatch == (4 if mb == -1 else mb)
    state = replicate(training.state, 2)
    metrics = []
    for step in range(3):
      state, m = training.p_train_steps(state, jax.tree.map(lambda x: x[:, None], shard(global_batch(step, 8), 2)))
      metrics.append(unreplicate(m))
    results[mb] = unreplicate(state), metrics
  (whole, whole_metrics), (micro, micro_metrics) = results[-1], results[microbatch]
  for part in ("params", "ema_params", "opt_state", "sampler_state"):
    assert_trees_close(getattr(micro, part), getattr(whole, part), rtol=1e-4, atol=1e-6)
  assert_trees_close(micro_metrics, whole_metrics, rtol=1e-4, atol=1e-6)
  assert max(float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(whole.params), jax.tree.leaves(setup(tiny_config())[0].state.params))) > 1e-4


@pytest.mark.parametrize("requested, backend, image_size, channels, per_device, expected", [
    (0, "cpu", 32, 64, 16, 4),     # CIFAR-10 at 64 channels: at least 4 images (2 would fill the 512 KiB)
    (0, "cpu", 32, 128, 16, 4),    # the paper's width
    (0, "cpu", 64, 192, 16, 4),    # CelebA 64
    (0, "cpu", 16, 32, 32, 16),    # the digits: 16 images of 32 KiB fill the 512 KiB
    (0, "cpu", 32, 32, 6, 3),      # the largest divisor within the limit (4 would be allowed)
    (0, "cpu", 32, 64, 2, 2),      # fewer images than the minimum: the whole per-device batch
    (0, "cpu", 8, 32, 4, 4),       # small images: the whole per-device batch
    (0, "gpu", 32, 64, 16, 16),    # accelerators: no micro-batches unless asked
    (-1, "cpu", 32, 64, 16, 16),
    (8, "gpu", 32, 64, 16, 8),
])
def test_resolve_microbatch(requested, backend, image_size, channels, per_device, expected):
  config = tiny_config(microbatch=requested)
  config.model.image_size, config.model.model_channels, config.model.dtype = image_size, channels, "float32"
  assert train_step.resolve_microbatch(config, per_device, backend=backend) == expected


def test_only_finalized_checkpoints_are_restored(tmp_path):
  directory = tmp_path / "ckpt"
  target = {"step": np.zeros((), np.int32), "w": np.zeros((3,), np.float32)}
  manager = checkpointing.make_manager(str(directory), max_to_keep=5)
  for step in (1, 2):
    checkpointing.save(manager, step, {"step": np.asarray(step, np.int32), "w": np.full((3,), step, np.float32)})
  manager.wait_until_finished()
  manager.close()
  # A save of step 3 killed before orbax's final rename: a complete-looking copy under the temporary name.
  shutil.copytree(directory / "2", directory / "3.orbax-checkpoint-tmp-1234567890")
  manager = checkpointing.make_manager(str(directory), max_to_keep=5)
  state, step = checkpointing.restore_latest(manager, target)
  assert step == 2
  np.testing.assert_array_equal(state["w"], np.full((3,), 2, np.float32))
  # Keeps the last K: with max_to_keep=2, steps 1 and 2 give way to 4 and 5.
  manager = checkpointing.make_manager(str(tmp_path / "keep"), max_to_keep=2, keep_period=4)
  for step in range(1, 7):
    checkpointing.save(manager, step, {"step": np.asarray(step, np.int32), "w": np.zeros((3,), np.float32)})
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [4, 5, 6]
  manager.close()


def test_restore_of_a_different_structure_says_so(tmp_path):
  manager = checkpointing.make_manager(str(tmp_path / "ckpt"), max_to_keep=1)
  checkpointing.save(manager, 1, {"w": np.zeros((3,), np.float32)})
  manager.wait_until_finished()
  with pytest.raises(ValueError, match="No checkpoint in .* can be restored here: step 1: .* do not match this config"):
    checkpointing.restore_latest(manager, {"w": np.zeros((4,), np.float32), "v": np.zeros(2)})
  manager.close()


@pytest.mark.parametrize("field,value,message", [
    ("diffusion.noise_schedule", "cosinus", "noise_schedule='cosinus' is not one of"),
    ("diffusion.input_perturbation", -0.1, "gamma"),
    ("training.schedule_sampler", "importance", "schedule_sampler"),
    ("training.ema_rates", (1.5,), "ema_rates"),
    ("training.ema_rates", (), "ema_rates=\\(\\) must be one or more"),  # sampling needs an EMA
    ("training.learning_rate", float("inf"), "learning_rate=inf must be a finite number"),
    ("diffusion.input_perturbation", float("inf"), "gamma\\)=inf must be a finite number"),
    ("diffusion.input_perturbation", float("nan"), "gamma\\)=nan must be a finite number"),
    ("seed", 2**64, "config.seed=18446744073709551616 must be an integer in"),
    ("seed", -1, "config.seed=-1 must be an integer in"),
    ("training.num_train_steps", -5, "num_train_steps=-5 must be an integer >= 1"),
    ("training.grid_sampling_steps", "ddimx", "is not a respacing"),
    ("model.model_channels", 48, "multiple of 32"),
    ("sampling.sampler", "euler", "sampler='euler'"),
    ("training.microbatch", -2, "microbatch \\(0 = automatic, -1 = the whole per-device batch\\)=-2 must be"),
])
def test_config_validation_names_the_bad_field(field, value, message):
  config = tiny_config()
  *section, name = field.split(".")
  (config[section[0]] if section else config)[name] = value
  with pytest.raises(config_validation.ConfigError, match=message):
    config_validation.validate_config(config)


def test_indivisible_batch_is_rejected():
  config = tiny_config(batch_size=5)
  config_validation.validate_config(config)
  with pytest.raises(config_validation.ConfigError, match="does not divide over the 2 devices"):
    config_validation.validate_config(config, num_devices=2)


def test_microbatch_that_does_not_divide_the_device_batch_is_rejected():
  config = tiny_config(batch_size=8, microbatch=3)
  config_validation.validate_config(config)
  with pytest.raises(config_validation.ConfigError, match="microbatch=3 does not divide the per-device batch of 4"):
    config_validation.validate_config(config, num_devices=2)
  config_validation.validate_config(tiny_config(batch_size=8, microbatch=2), num_devices=2)


def test_summarize_metrics_averages_over_examples_and_quarters():
  one = {"count": 4.0, "steps": 1.0, "grad_norm": 2.0, "loss": 8.0, "loss_q0": 3.0, "loss_q1": 0.0,
         "loss_q2": 0.0, "loss_q3": 5.0, "count_q0": 1.0, "count_q1": 0.0, "count_q2": 0.0, "count_q3": 3.0}
  out = train_step.summarize_metrics([one, one])
  assert out == {"grad_norm": 2.0, "loss": 2.0, "loss/q0": 3.0, "loss/q3": 5.0 / 3.0}



@pytest.mark.parametrize("skip", [False, True])
def test_a_nan_batch_is_flagged_and_skipped_when_asked(skip):
  """One NaN pixel on one device makes the global loss NaN: flagged on every device; with
  skip_nonfinite_updates the step keeps params, Adam state, EMA and sampler history (the step count moves)."""
  training, _ = setup(tiny_config(skip_nonfinite_updates=skip))
  p_step = training.p_train_steps
  good = run_steps(p_step, replicate(training.state, 2), range(0, 1), 1, 4)
  before = unreplicate(good)  # the step donates its input state
  batch = shard(global_batch(1), 2)
  batch["image"][1, 0, 0, 0, 0] = np.nan
  bad, metrics = p_step(good, jax.tree.map(lambda x: x[:, None], batch))
  m = jax.device_get(metrics)
  np.testing.assert_array_equal(m["nonfinite"], [1.0, 1.0])
  np.testing.assert_array_equal(m["first_nonfinite_step"], [2, 2])
  after = unreplicate(bad)
  assert int(after.step) == 2
  if skip:
    for part in ("params", "ema_params", "opt_state", "sampler_state"):
      assert_trees_close(getattr(after, part), getattr(before, part), rtol=0, atol=0)
    assert m["steps"][0] == 0 and m["count"][0] == 0  # left out of the averages
    assert train_step.summarize_metrics([unreplicate(metrics)]) == {"skipped_steps": 1.0}
  else:
    assert not all(np.isfinite(x).all() for x in jax.tree.leaves(after.params))


def test_one_vector_collectives_equal_the_per_leaf_ones():
  """psum_tree (one all-reduce on CPU) gives what lax.psum per leaf gives, ints included, and a psum of
  own_slot is lax.all_gather."""
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(2, 3, 4)).astype(np.float32),
          "b": [rng.normal(size=(2,)).astype(np.float32), rng.integers(0, 4000, (2, 5)).astype(np.int32)]}
  want = jax.device_get(jax.pmap(lambda t: lax.psum(t, "batch"), axis_name="batch")(tree))
  for flat in (None, True, False):  # None: flat on this CPU backend
    got = jax.device_get(jax.pmap(lambda t, flat=flat: train_step.psum_tree(t, "batch", flat), axis_name="batch")(tree))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert x.dtype == y.dtype
      np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(want["b"][1][0], tree["b"][1].sum(0))
  ints = tree["b"][1]  # [2 devices, 5]
  gathered = jax.device_get(jax.pmap(
      lambda x: (train_step.psum_tree(train_step.own_slot(x, "batch"), "batch"), lax.all_gather(x, "batch")),
      axis_name="batch")(ints))
  np.testing.assert_array_equal(gathered[0], gathered[1])
  np.testing.assert_array_equal(gathered[0][0], ints)


def test_step_keeps_few_parameter_sized_temporaries():
  """The compiled step (2 devices, the tiny UNet, whose temporaries are mostly parameter-sized) holds at most 4
  parameter-sized buffers of temporaries per device: the accumulated and the summed gradients, the updates and
  a spare. It held 7 before the optimizer's copies were removed (flat copies of the params and the EMA, copies
  of both moments kept alive through the backward pass, a slice of the all-reduced vector; docs/performance.md)."""
  config = tiny_config(batch_size=8)
  training, _ = setup(config)
  batch = jax.tree.map(lambda x: x[:, None], shard(global_batch(0, 8), 2))
  compiled = training.p_train_steps.lower(train_state.replicate_state(training.state), batch).compile()
  param_bytes = 4 * models.count_params(training.state.params)
  temporaries = compiled.memory_analysis().temp_size_in_bytes
  assert temporaries <= 4 * param_bytes, temporaries / param_bytes


@pytest.mark.parametrize("grad_clip, warmup_steps", [(0.0, 0), (1.0, 10)])
def test_fresh_optimizer_state_is_the_init_of_the_flat_params(grad_clip, warmup_steps):
  """make_train_state initialises the optimizer from a zero vector of the parameter count (not the flattened
  params, whose flattening costs a start 0.3-0.5 s): the same state as tx.init(ravel_pytree(params))."""
  from jax.flatten_util import ravel_pytree  # pylint: disable=import-outside-toplevel
  training, _ = setup(tiny_config(grad_clip=grad_clip, warmup_steps=warmup_steps))
  expected = training.tx.init(ravel_pytree(training.state.params)[0])
  assert jax.tree.structure(training.state.opt_state) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(training.state.opt_state), jax.tree.leaves(expected)):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
