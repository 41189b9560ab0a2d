"""host_memory: reading the kernel's THP mode and when the CPU runs advise the glibc huge-page tunable."""
import logging

from ddpm_ip_jax import host_memory


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  f = tmp_path / "enabled"
  for text, mode in (("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"),
                     ("always madvise [never]\n", "never"), ("garbage\n", None)):
    f.write_text(text)
    assert host_memory.thp_mode(str(f)) == mode
  assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def test_advice_only_where_the_tunable_would_help():
  message = host_memory.advice({}, "madvise")
  assert f"GLIBC_TUNABLES={host_memory.TUNABLE}" in message
  assert host_memory.advice({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise") is None
  # Another tunable already set: still advised (the user adds ours with a colon).
  assert host_memory.advice({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise") == message
  # Any explicit hugetlb choice is the user's; "always" already gives huge pages; "never" cannot.
  assert host_memory.advice({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise") is None
  for mode in ("always", "never", None):
    assert host_memory.advice({}, mode) is None


def test_warn_if_slow_logs_on_cpu_only(monkeypatch, caplog):
  monkeypatch.setattr(host_memory, "thp_mode", lambda: "madvise")
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  with caplog.at_level(logging.WARNING):
    assert host_memory.warn_if_slow("gpu") is None
    assert not caplog.records
    message = host_memory.warn_if_slow("cpu")
  assert message and message in caplog.text
  monkeypatch.setenv("GLIBC_TUNABLES", host_memory.TUNABLE)
  assert host_memory.warn_if_slow("cpu") is None
