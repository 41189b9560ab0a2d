"""Lists every import of a command module (a module with an `if __name__ == "__main__":` entry) by a module of
the package; prints nothing and exits 0 when there is none. Commands are thin: nothing may import them.

  python tests/check_imports.py
"""
import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ddpm_ip_jax"


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


if __name__ == "__main__":
  problems = imports_of_commands()
  print("\n".join(problems))
  sys.exit(1 if problems else 0)
