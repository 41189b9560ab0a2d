"""Checks that the package's layers hold (README.md, "Layout"); prints each import that breaks them and exits 1, or
prints nothing and exits 0:

- nothing imports a command module (a module with an `if __name__ == "__main__":` entry): commands are thin;
- a method module (METHOD_MODULES) imports, of the package, only other method modules: no library or loop module,
  and so no file I/O (`fileio`).

  python tests/check_imports.py [PACKAGE_DIR]   (default: this repository's ddpm_ip_jax)
"""
import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ddpm_ip_jax"

# The method: the network, the diffusion, the objective, the samplers, the exposure-bias measures, and the
# evaluation's networks and metrics. Pure functions of arrays and params; whoever calls them reads and writes files.
METHOD_MODULES = frozenset({
    "ddpm_ip_jax.models", "ddpm_ip_jax.models.unet", "ddpm_ip_jax.models.conv", "ddpm_ip_jax.diffusion",
    "ddpm_ip_jax.models.group_norm", "ddpm_ip_jax.models.dropout", "ddpm_ip_jax.objective",
    "ddpm_ip_jax.timestep_sampler", "ddpm_ip_jax.sampling", "ddpm_ip_jax.exposure", "ddpm_ip_jax.evaluation",
    "ddpm_ip_jax.evaluation.inception", "ddpm_ip_jax.evaluation.metrics", "ddpm_ip_jax.evaluation.digits",
    "ddpm_ip_jax.evaluation.extractors"})

# (method module, module of the package) imports that remain, each with why; none is to be added lightly.
METHOD_EXCEPTIONS = {
    ("ddpm_ip_jax.evaluation.inception", "ddpm_ip_jax.state_dicts"):
        "load_inception_params reads the weights file, and the golden tests/test_inception.py calls it there",
}


def module_name(path, package=PACKAGE):
  parts = path.relative_to(package.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node):
  return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
          and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
          and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


def command_modules(package=PACKAGE):
  """Names of the package's modules that have a `__main__` entry."""
  return {module_name(p, package) for p in package.rglob("*.py")
          if any(_is_main_guard(n) for n in ast.parse(p.read_text()).body)}


def imported_modules(tree, name):
  """Every module `tree` (the module `name`) imports, anywhere in it (function-level imports included)."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        base = ".".join(name.split(".")[:-node.level] + ([base] if base else []))
      out.add(base)
      out.update(f"{base}.{a.name}" for a in node.names)
  return out


def imports_of_commands(package=PACKAGE):
  """["<importer> imports <command>", ...] for the package."""
  commands = command_modules(package)
  found = []
  for path in sorted(package.rglob("*.py")):
    name = module_name(path, package)
    for imported in sorted(imported_modules(ast.parse(path.read_text()), name) & commands):
      if imported != name:
        found.append(f"{name} imports {imported}")
  return found


def method_imports_of_the_library(package=PACKAGE, method=METHOD_MODULES, allowed=METHOD_EXCEPTIONS):
  """["<method module> imports <module>, not a method module", ...]: the package's modules that a module of `method`
  imports (anywhere in it) other than method modules and the package itself, less the `allowed` pairs."""
  modules = {module_name(p, package): p for p in package.rglob("*.py")}
  found = []
  for name in sorted(method & set(modules)):
    for imported in sorted(imported_modules(ast.parse(modules[name].read_text()), name) & set(modules)):
      if imported not in method and imported != package.name and (name, imported) not in allowed:
        found.append(f"{name} imports {imported}, not a method module")
  return found


if __name__ == "__main__":
  root = pathlib.Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else PACKAGE
  problems = imports_of_commands(root) + method_imports_of_the_library(root)
  print("\n".join(problems))
  sys.exit(1 if problems else 0)
