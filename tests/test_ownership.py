"""One owner per directory (ddpm_ip_jax/ownership.py): the lock is taken and released, a second taker is refused
with the owner named, a dead owner's lock is taken over with a warning, the lock goes with an exception and with
SIGTERM and stays after SIGKILL; the same in a bucket (the local GCS emulator); and end to end: two training runs
started together into one new workdir, one of them wins, and empty path flags are refused."""
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys

import pytest

import gcs_emulator
from helpers import REPO, TOY_TRAIN_ARGS, assert_one_fatal_line, fatal_lines, popen_command, run_command
from helpers import run_commands_in_parallel
from ddpm_ip_jax import fileio
from ddpm_ip_jax import ownership


def _record(path):
  return json.loads(open(path).read())


def _dead_pid():
  """The pid of a process that has ended (and been reaped)."""
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                        check=True)
  return int(proc.stdout)


def _foreign_record(**fields):
  return dict(dict(host=socket.gethostname(), pid=1, start_ticks=None, started="2020-01-01T00:00:00+00:00",
                   command="python -m ddpm_ip_jax.main --workdir=elsewhere", token="f" * 32), **fields)


def test_the_lock_holds_the_owner_and_goes_at_the_end(tmp_path):
  with ownership.hold(tmp_path, "--workdir") as lock:
    record = _record(tmp_path / ".lock")
    assert lock.path == str(tmp_path / ".lock") and record == lock.record
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["started"] and record["command"] == shlex.join(sys.orig_argv)  # this process's command line
  assert not (tmp_path / ".lock").exists()
  with ownership.hold(tmp_path, "--workdir"):  # taken again once released (a resumed run)
    assert (tmp_path / ".lock").exists()


def test_a_second_taker_is_refused_with_the_owner_named(tmp_path):
  with ownership.hold(tmp_path, "--workdir") as lock:
    with pytest.raises(ownership.DirectoryInUseError) as refused:
      ownership.acquire(tmp_path, "--workdir")
    assert _record(tmp_path / ".lock") == lock.record  # untouched
  message = str(refused.value)
  assert f"--workdir {tmp_path} is in use by another run: pid {os.getpid()} on host {socket.gethostname()}" in message
  assert f"started {lock.record['started']}" in message and f"delete {tmp_path / '.lock'}" in message


@pytest.mark.parametrize("owner", ["live process", "another host"])
def test_a_live_or_unverifiable_owner_keeps_the_lock(tmp_path, owner):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    record = (_foreign_record(pid=sleeper.pid, start_ticks=ownership._start_ticks(sleeper.pid))
              if owner == "live process" else _foreign_record(host="elsewhere.example", pid=_dead_pid()))
    (tmp_path / ".lock").write_text(json.dumps(record))
    with pytest.raises(ownership.DirectoryInUseError, match=f"pid {record['pid']} on host {record['host']}"):
      ownership.acquire(tmp_path, "the output directory")
    assert _record(tmp_path / ".lock") == record
  finally:
    sleeper.kill()
    sleeper.wait()


@pytest.mark.parametrize("owner", ["dead pid", "pid reused by a later process"])
def test_a_dead_owner_is_taken_over_with_a_warning(tmp_path, caplog, owner):
  if owner != "dead pid" and ownership._start_ticks(os.getppid()) is None:
    pytest.skip("no /proc/<pid>/stat here")
  stale = (_foreign_record(pid=_dead_pid()) if owner == "dead pid"
           else _foreign_record(pid=os.getppid(), start_ticks=ownership._start_ticks(os.getppid()) - 1))
  (tmp_path / ".lock").write_text(json.dumps(stale))
  with caplog.at_level(logging.WARNING):
    with ownership.hold(tmp_path, "--workdir") as lock:
      assert _record(tmp_path / ".lock") == lock.record
  warnings = [r.getMessage() for r in caplog.records if "Taking over the lock" in r.getMessage()]
  assert len(warnings) == 1 and f"pid {stale['pid']}" in warnings[0]
  assert not os.listdir(tmp_path)  # nothing left aside


def test_the_lock_goes_when_the_body_raises_and_is_skipped_off_process_0(tmp_path):
  with pytest.raises(RuntimeError):
    with ownership.hold(tmp_path, "--workdir"):
      raise RuntimeError("boom")
  assert not (tmp_path / ".lock").exists()
  with ownership.hold(tmp_path, "--workdir", chief=False) as lock:
    assert lock is None and not (tmp_path / ".lock").exists()


_HOLDER = ("import sys, time\nfrom ddpm_ip_jax import ownership\nownership.acquire(sys.argv[1], '--workdir')\n"
           "print('held', flush=True)\ntime.sleep(60)\n")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_sigterm_releases_the_lock_and_a_restart_after_sigkill_takes_it_over(tmp_path, caplog, sig):
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(ownership.DirectoryInUseError, match=f"pid {holder.pid} "):
      ownership.acquire(tmp_path, "--workdir")
    holder.send_signal(sig)
    assert holder.wait(timeout=30) == -sig  # ended by the signal, as without the lock
  finally:
    holder.kill()
    holder.wait()
  assert (tmp_path / ".lock").exists() == (sig == signal.SIGKILL)
  with caplog.at_level(logging.WARNING):
    with ownership.hold(tmp_path, "--workdir"):
      pass
  assert any(f"Taking over the lock {tmp_path / '.lock'}" in r.getMessage() for r in caplog.records) == (
      sig == signal.SIGKILL)


def test_in_a_bucket(monkeypatch, caplog):
  monkeypatch.setattr(ownership, "BUCKET_SETTLE_S", 0.1)
  with gcs_emulator.running(bucket="bkt"):
    with ownership.hold("gs://bkt/runs/a", "--workdir") as lock:
      assert json.loads(fileio.read_text("gs://bkt/runs/a/.lock")) == lock.record
      with pytest.raises(ownership.DirectoryInUseError, match=f"pid {os.getpid()} "):
        ownership.acquire("gs://bkt/runs/a", "--workdir")
    assert not fileio.exists("gs://bkt/runs/a/.lock")

    stale = _foreign_record(pid=_dead_pid())
    fileio.write_text("gs://bkt/runs/b/.lock", json.dumps(stale))
    with caplog.at_level(logging.WARNING):
      with ownership.hold("gs://bkt/runs/b", "--workdir") as lock:
        assert json.loads(fileio.read_text("gs://bkt/runs/b/.lock")) == lock.record
    assert any("Taking over the lock gs://bkt/runs/b/.lock" in r.getMessage() for r in caplog.records)

    # Another run writes its record right after this one's (both found none): the later writer wins.
    other = _foreign_record(host="elsewhere.example")
    write_text = fileio.write_text

    def and_then_the_other(path, text):
      write_text(path, text)
      write_text(path, json.dumps(other))

    monkeypatch.setattr(fileio, "write_text", and_then_the_other)
    with pytest.raises(ownership.DirectoryInUseError, match="pid 1 on host elsewhere.example"):
      ownership.acquire("gs://bkt/runs/c", "--workdir")


# --- end to end ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def race(tmp_path_factory):
  """Two toy training runs (gamma 0.1 and 0.5) started together into one new workdir, and the commands given
  an empty path flag, one at a time beside them."""
  d = tmp_path_factory.mktemp("ownership")
  train = [*TOY_TRAIN_ARGS, f"--workdir={d}/run", "--config.training.num_train_steps=2"]
  runs = {gamma: popen_command("main", *train, f"--config.diffusion.input_perturbation={gamma}")
          for gamma in (0.1, 0.5)}
  empties = run_commands_in_parallel({"main --workdir=": ("main", *TOY_TRAIN_ARGS, "--workdir="),
                                      "sample --output_dir=": ("sample", f"--workdir={d}/run", "--output_dir="),
                                      "study --docs=": ("study", f"--workdir={d}/study", "--docs=")},
                                     workers=1)  # the two runs take the other two cores
  ends = {gamma: (proc.wait(timeout=300), proc.stderr.read(), proc.pid) for gamma, proc in runs.items()}
  return d, ends, empties


@pytest.mark.slow
def test_two_runs_into_one_workdir_one_wins(race):
  d, ends, _ = race
  codes = sorted(rc for rc, _, _ in ends.values())
  assert codes == [0, 1], {g: (rc, err[-2000:]) for g, (rc, err, _) in ends.items()}
  (winner,) = [g for g, (rc, _, _) in ends.items() if rc == 0]
  (loser,) = [g for g, (rc, _, _) in ends.items() if rc == 1]
  (fatal,) = fatal_lines(ends[loser][1])
  assert f"--workdir {d}/run is in use by another run: pid {ends[winner][2]} on host" in fatal, fatal
  assert f"input_perturbation={winner}" in fatal and f"delete {d}/run/.lock" in fatal, fatal
  assert "Training steps" not in ends[loser][1]
  config = json.loads((d / "run" / "config.json").read_text())
  assert config["diffusion"]["input_perturbation"] == winner
  assert not (d / "run" / ".lock").exists()  # released at the end: a rerun resumes


@pytest.mark.slow
@pytest.mark.parametrize("case", ["main --workdir=", "sample --output_dir=", "study --docs="])
def test_an_empty_path_flag_is_one_fatal_line(race, case):
  d, _, empties = race
  proc = empties[case]
  flag = case.split()[1].rstrip("=")
  fatal = assert_one_fatal_line(proc)
  assert fatal == f"FATAL {flag} is empty ({flag}= with nothing after it, e.g. an unset shell variable); give a path."
  assert not (d / "study").exists()  # refused before the study made its workdir


@pytest.mark.slow
def test_sample_into_an_output_directory_in_use_is_refused(race):
  d, ends, _ = race
  assert 0 in [rc for rc, _, _ in ends.values()]  # the trained run to sample from
  out = d / "samples"
  out.mkdir()
  with ownership.hold(out, "--output_dir"):
    proc = run_command("sample", f"--workdir={d}/run", f"--output_dir={out}", "--num_samples=2", "--steps=2")
  fatal = assert_one_fatal_line(proc)
  assert f"--output_dir {out} is in use by another run: pid {os.getpid()} " in fatal, fatal
  assert sorted(os.listdir(out)) == []  # nothing of the refused run
