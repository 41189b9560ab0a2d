"""The layering of the package: commands are thin, nothing imports them; the method imports nothing of the library
(tests/check_imports.py, also the pre-commit hook); the lint settings hold."""
import importlib.util
import subprocess
import sys

import pytest

import check_imports
from helpers import REPO


def test_no_module_of_the_package_imports_a_command_module():
  commands = check_imports.command_modules()
  assert {"ddpm_ip_jax.main", "ddpm_ip_jax.sample", "ddpm_ip_jax.evaluate", "ddpm_ip_jax.convert",
          "ddpm_ip_jax.exposure_bias", "ddpm_ip_jax.study", "ddpm_ip_jax.benchmark",
          "ddpm_ip_jax.evaluation.digits_classifier", "ddpm_ip_jax.evaluation.convert_inception"} <= commands
  assert check_imports.imports_of_commands() == []


def test_the_checker_finds_an_import_of_a_command(tmp_path):
  package = tmp_path / "ddpm_ip_jax"
  package.mkdir()
  (package / "cmd.py").write_text('def main():\n  pass\n\n\nif __name__ == "__main__":\n  main()\n')
  (package / "lib.py").write_text("def f():\n  from ddpm_ip_jax import cmd\n  return cmd\n")
  (package / "ok.py").write_text("import os\n")
  assert check_imports.command_modules(package) == {"ddpm_ip_jax.cmd"}
  assert check_imports.imports_of_commands(package) == ["ddpm_ip_jax.lib imports ddpm_ip_jax.cmd"]


def test_the_method_imports_no_library_module():
  modules = {check_imports.module_name(p) for p in check_imports.PACKAGE.rglob("*.py")}
  assert check_imports.METHOD_MODULES <= modules, check_imports.METHOD_MODULES - modules
  assert {m for _, m in check_imports.METHOD_EXCEPTIONS} & check_imports.METHOD_MODULES == set()
  assert check_imports.method_imports_of_the_library() == []
  out = subprocess.run([sys.executable, "tests/check_imports.py"], cwd=REPO, capture_output=True, text=True)
  assert (out.returncode, out.stdout.strip()) == (0, ""), out.stdout


def _fake_package(root):
  """A package ddpm_ip_jax under `root` that breaks both rules: lib imports the command cmd, and the method module
  diffusion imports fileio (in a function); sampling (method) imports diffusion (method), as it may."""
  package = root / "ddpm_ip_jax"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "cmd.py").write_text('def main():\n  pass\n\n\nif __name__ == "__main__":\n  main()\n')
  (package / "lib.py").write_text("def f():\n  from ddpm_ip_jax import cmd\n  return cmd\n")
  (package / "fileio.py").write_text("import os\n")
  (package / "diffusion.py").write_text("def save(x):\n  from ddpm_ip_jax import fileio\n  return fileio, x\n")
  (package / "sampling.py").write_text("from ddpm_ip_jax import diffusion as diffusion_lib\n")
  return package


def test_the_checker_finds_a_method_module_importing_the_library(tmp_path):
  package = _fake_package(tmp_path)
  assert check_imports.method_imports_of_the_library(package) == [
      "ddpm_ip_jax.diffusion imports ddpm_ip_jax.fileio, not a method module"]
  allowed = {("ddpm_ip_jax.diffusion", "ddpm_ip_jax.fileio"): "a reason"}
  assert check_imports.method_imports_of_the_library(package, allowed=allowed) == []
  out = subprocess.run([sys.executable, "tests/check_imports.py", str(package)], cwd=REPO, capture_output=True,
                       text=True)
  assert out.returncode == 1
  assert out.stdout.splitlines() == ["ddpm_ip_jax.lib imports ddpm_ip_jax.cmd",
                                     "ddpm_ip_jax.diffusion imports ddpm_ip_jax.fileio, not a method module"]


def test_the_package_installs_no_top_level_configs():
  import ddpm_ip_jax  # pylint: disable=import-outside-toplevel
  out = subprocess.run([sys.executable, "-c", "import configs"], cwd="/", capture_output=True, text=True)
  assert out.returncode != 0 and "No module named 'configs'" in out.stderr, ddpm_ip_jax.__file__


NO_RUFF = importlib.util.find_spec("ruff") is None


@pytest.mark.skipif(NO_RUFF, reason="ruff comes with the test extra")
def test_ruff_lint_passes():
  paths = ["ddpm_ip_jax", "tests", "configs", "benchmarks"]
  out = subprocess.run([sys.executable, "-m", "ruff", "check", "--force-exclude", *paths], cwd=REPO,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stdout[-3000:]
