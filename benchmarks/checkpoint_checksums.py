"""What the checkpoints' checksums cost: a save and a restore of a config's train state through orbax alone and
through `checkpointing` (CRC-32 of every array written with the step, checked on restore), alternating.

  python benchmarks/checkpoint_checksums.py [--config=configs/cifar10.py] [--dir=/dev/shm/ckpt] [--reps=4]

Prints one JSON line of sizes, then one per time, in seconds (median, min, each repetition): `call` (what the
training loop waits for: `save` returns while orbax writes), `save` (the call plus waiting for the write and,
checked, writing checksums.json), `restore` (checked: `restore_latest`, with the verification), and `checksums`
(`array_checksums` of the state alone).
The state is `train_step.create_training(config).state` on the host; `--dir` is emptied at every save.
"""
import argparse
import importlib.util
import json
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from ddpm_ip_jax import checkpointing
from ddpm_ip_jax import train_step


def _load_config(path):
  spec = importlib.util.spec_from_file_location("benchmarked_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _save(directory, state, checked):
  """(call seconds, save seconds) of one save of `state` as step 1 into the emptied `directory`."""
  shutil.rmtree(directory, ignore_errors=True)
  manager = checkpointing.make_manager(directory, max_to_keep=1)
  start = time.perf_counter()
  if checked:
    checkpointing.save(manager, 1, state)
    call = time.perf_counter() - start
    checkpointing.wait(manager)
  else:
    manager.save(1, args=ocp.args.StandardSave(jax.device_get(state)), force=True)
    call = time.perf_counter() - start
    manager.wait_until_finished()
  total = time.perf_counter() - start
  manager.close()
  return call, total


def _restore(directory, target, checked):
  manager = checkpointing.make_manager(directory, create=False)
  start = time.perf_counter()
  if checked:
    _, step = checkpointing.restore_latest(manager, target)
    assert step == 1
  else:
    manager.restore(1, args=ocp.args.StandardRestore(jax.device_get(target)))
  seconds = time.perf_counter() - start
  manager.close()
  return seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/cifar10.py")
  parser.add_argument("--dir", default="/tmp/checkpoint_checksums_bench")
  parser.add_argument("--reps", type=int, default=4)
  args = parser.parse_args()
  state = jax.device_get(train_step.create_training(_load_config(args.config)).state)
  leaves = jax.tree.leaves(state)
  print(json.dumps({"params": int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
                    "arrays": len(leaves), "mib": round(sum(np.asarray(x).nbytes for x in leaves) / 2**20)}))
  times = {f"{what}_{kind}": [] for what in ("call", "save", "restore") for kind in ("plain", "checked")}
  times["checksums"] = []
  for rep in range(args.reps):
    for checked in ((False, True) if rep % 2 == 0 else (True, False)):  # alternating, against drift
      kind = "checked" if checked else "plain"
      call, total = _save(args.dir, state, checked)
      times[f"call_{kind}"].append(call)
      times[f"save_{kind}"].append(total)
      times[f"restore_{kind}"].append(_restore(args.dir, state, checked))
    start = time.perf_counter()
    checkpointing.array_checksums(state)
    times["checksums"].append(time.perf_counter() - start)
  shutil.rmtree(args.dir, ignore_errors=True)
  for name, ts in times.items():
    print(json.dumps({name: {"median": round(float(np.median(ts)), 2), "min": round(min(ts), 2),
                             "runs": [round(t, 2) for t in ts]}}))


if __name__ == "__main__":
  main()
