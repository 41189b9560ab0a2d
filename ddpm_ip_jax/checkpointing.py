"""Orbax checkpoints of the train state: saved asynchronously, the last K kept plus every M-th step,
and the run resumes from the latest complete one.

Orbax writes each step into `<step>.orbax-checkpoint-tmp-<time>` and renames it to `<step>` only when
every file is written, and lists only renamed (finalized) steps: a run killed in the middle of a save
resumes from the checkpoint before it.
"""
import jax
import orbax.checkpoint as ocp

from ddpm_ip_jax import fileio


def create_manager(directory, *, max_to_keep=None, keep_period=0, create=True):
  """A CheckpointManager for `directory` (created if needed) that keeps the last `max_to_keep`
  checkpoints plus every step divisible by `keep_period` (0: none). The caller decides when to save."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      keep_period=keep_period or None,
      create=create,
      enable_async_checkpointing=True,
  )
  return ocp.CheckpointManager(fileio.absolute(directory), options=options)


def save(manager, step, state):
  """Starts saving `state` (a pytree of host or device arrays) as `step`; returns without waiting for
  the write. The next save, `wait_until_finished()` or `close()` waits for it."""
  state = jax.device_get(state)
  return manager.save(int(step), args=ocp.args.StandardSave(state), force=True)


def restore_latest(manager, target=None):
  """Returns (state, step) from the latest finalized checkpoint, or (target, None) if there is none.

  `target` is a state of the same structure (e.g. the freshly initialised one); its leaves give the
  shapes and dtypes. A checkpoint of a different structure (another model size, other EMA rates) is
  reported with its location. Without a target the checkpoint comes back as saved, as nested dicts.
  """
  step = manager.latest_step()
  if step is None:
    return target, None
  if target is None:
    return manager.restore(step, args=ocp.args.StandardRestore()), step
  try:
    state = manager.restore(step, args=ocp.args.StandardRestore(jax.device_get(target)))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f"The checkpoint of step {step} in {manager.directory} does not match this config (other "
        f"model size, EMA rates or timestep sampler?). Use a new workdir or the config of that run. "
        f"Orbax said: {e}") from e
  return state, step


def restore_trained(checkpoint_dir):
  """(the latest complete training checkpoint in `checkpoint_dir` as nested dicts, its step): read-only, for
  sampling and evaluation; FileNotFoundError when there is none."""
  state, step = None, None
  if fileio.is_dir(checkpoint_dir):
    manager = create_manager(checkpoint_dir, create=False)
    state, step = restore_latest(manager)
    manager.close()
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir}")
  return state, step
