"""The Markdown tables of benchmarks/compare_reference.sh: JAX against the PyTorch reference, pair by pair.

  python benchmarks/compare_table.py DIR

DIR holds what compare_reference.sh wrote: `setup.json` (the host and the settings) and one
`pair<N>_<side>_<part>.jsonl` per process (side `jax` or `reference`, part `train` or `sample`): the JSON lines
the process printed, then the line `{"what": "wall", "wall_s": ..., "rc": ...}` that the script adds (the
process's wall time from launch to exit and its exit status).

Start-up is the time from the process's launch to the end of its first training step: the field
`first_step_since_start_s` where the benchmark prints it; otherwise it is estimated from the wall time minus the
steps that ran after the first one at their measured median (for JAX the timed and the pipelined steps, for the
reference its remaining warm-up and timed steps), which leaves the process's exit in it; estimates are marked `~`.
Ratios are JAX / reference; the median row takes each column's median over the pairs, the ratios' median of
the per-pair ratios.
"""
import json
import pathlib
import re
import statistics
import sys

SIDES = ("jax", "reference")
_RUN_FILE = re.compile(r"pair(\d+)_(jax|reference)_(train|sample)\.jsonl$")
_MISSING = "n/a"


def load_runs(folder):
  """The runs in `folder`: {(pair, side, part): {"result": the benchmark's JSON line or None, "wall_s", "rc"}}."""
  runs = {}
  for path in sorted(pathlib.Path(folder).iterdir()):
    m = _RUN_FILE.match(path.name)
    if not m:
      continue
    run = {"result": None, "wall_s": None, "rc": None}
    for line in path.read_text().splitlines():
      if not line.startswith("{"):
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if record.get("what") == "wall":
        run.update(wall_s=record.get("wall_s"), rc=record.get("rc"))
      elif record.get("what") in ("train", "sample", "reference_train", "reference_sample"):
        run["result"] = record
    runs[(int(m.group(1)), m.group(2), m.group(3))] = run
  return runs


def startup_s(run, side, setup):
  """(seconds from launch to the end of the first training step, whether it is an estimate); (None, False)
  when the run printed no result."""
  result = run["result"]
  if not result:
    return None, False
  if result.get("first_step_since_start_s") is not None:
    return float(result["first_step_since_start_s"]), False
  if run["wall_s"] is None:
    return None, False
  if side == "jax":
    n = int(setup["train_steps"])
    after = n * result["step_s"] + n * result.get("pipelined_step_s", result["step_s"])
  else:
    after = (int(setup["reference_warmup_steps"]) - 1 + int(setup["train_steps"])) * result["step_s"]
  return max(float(run["wall_s"]) - after, 0.0), True


def _cell(value, digits, suffix="", approx=False):
  if value is None:
    return _MISSING
  return f"{'~' if approx else ''}{value:.{digits}f}{suffix}"


def _ratio(a, b):
  return a / b if a is not None and b else None


def _get(runs, pair, side, part, key):
  result = runs.get((pair, side, part), {}).get("result")
  return None if not result or result.get(key) is None else float(result[key])


def _table(header, digits, suffixes, rows):
  """Markdown table lines: one row per pair, then the medians.

  Args:
    header: the column names after "pair".
    digits, suffixes: per column, the decimals and what follows the number ("x" for ratios).
    rows: (pair, [(value or None, whether it is an estimate), ...]) per pair.
  """
  lines = ["| pair | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
  for pair, cells in rows:
    lines.append(f"| {pair} | " + " | ".join(_cell(v, d, s, a) for (v, a), d, s in zip(cells, digits, suffixes))
                 + " |")
  medians = []
  for i, (d, s) in enumerate(zip(digits, suffixes)):
    column = [cells[i] for _, cells in rows if cells[i][0] is not None]
    value = statistics.median(v for v, _ in column) if column else None
    medians.append(_cell(value, d, s, any(a for _, a in column)))
  lines.append("| median | " + " | ".join(medians) + " |")
  return lines


def _train_table(runs, setup):
  rows = []
  for pair in sorted({p for (p, _, part) in runs if part == "train"}):
    ips = [_get(runs, pair, side, "train", "images_per_s") for side in SIDES]
    mem = [_get(runs, pair, side, "train", "peak_memory_gb") for side in SIDES]
    start = [startup_s(runs[(pair, side, "train")], side, setup) if (pair, side, "train") in runs else (None, False)
             for side in SIDES]
    rows.append((pair, [(ips[0], False), (ips[1], False), (_ratio(*ips), False), (mem[0], False),
                        (mem[1], False), *start]))
  return _table(["JAX images/s", "reference images/s", "JAX / reference", "JAX peak GB", "reference peak GB",
                 "JAX start-up s", "reference start-up s"], (2, 2, 2, 2, 2, 1, 1), ("", "", "x", "", "", "", ""),
                rows)


def _sample_table(runs):
  rows = []
  for pair in sorted({p for (p, _, part) in runs if part == "sample"}):
    sps = [_get(runs, pair, side, "sample", "samples_per_s") for side in SIDES]
    mem = [_get(runs, pair, side, "sample", "peak_memory_gb") for side in SIDES]
    rows.append((pair, [(sps[0], False), (sps[1], False), (_ratio(*sps), False), (mem[0], False),
                        (mem[1], False)]))
  return _table(["JAX samples/s", "reference samples/s", "JAX / reference", "JAX peak GB", "reference peak GB"],
                (3, 3, 2, 2, 2), ("", "", "x", "", ""), rows)


def _failures(runs):
  out = []
  for (pair, side, part), run in sorted(runs.items()):
    if run["result"] is None:
      out.append(f"- pair {pair}, {side} {part}: no result (exit status {run['rc']}; see its .log file)")
  return out


def render(setup, runs):
  """The report (header and tables) as Markdown text."""
  lines = ["# JAX against the PyTorch reference on the CPU", "",
           f"- date: {setup.get('date', '?')}",
           f"- machine: {setup.get('machine', '?')}, CPU: {setup.get('cpu', '?')}, cores: {setup.get('cores', '?')}",
           f"- JAX: {setup.get('cores', '?')} CPU devices, {setup.get('dtype', '?')}; reference: torch with "
           f"{setup.get('cores', '?')} threads, float32; GLIBC_TUNABLES={setup.get('glibc_tunables', '')}",
           f"- CIFAR-10 UNet with {setup.get('channels', '?')} base channels; each measurement its own process, "
           "JAX and the reference alternating", ""]
  parts = setup.get("parts", "train,sample").split(",")
  if "train" in parts:
    lines += [f"## Training step (batch {setup.get('batch', '?')}, median of {setup.get('train_steps', '?')} "
              "timed steps per process)", "", *_train_table(runs, setup), "",
              "Start-up: from the process's launch to the end of its first training step (compilation or "
              "warm-up included); ~ marks an estimate from the wall time.", ""]
  if "sample" in parts:
    lines += [f"## Sampler ({setup.get('sample_steps', '?')} respaced steps, ancestral, batch "
              f"{setup.get('sample_batch', '?')}, one timed chain per process after an untimed one)", "",
              *_sample_table(runs), ""]
  failures = _failures(runs)
  if failures:
    lines += ["Failed runs:", "", *failures, ""]
  return "\n".join(lines)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2
  folder = pathlib.Path(argv[0])
  setup = json.loads((folder / "setup.json").read_text())
  print(render(setup, load_runs(folder)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
