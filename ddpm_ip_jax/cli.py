"""Flags and start-up shared by the command-line programs (the modules with a `__main__` entry): the error policy
(`run`: one FATAL line), the start-up checks, a quiet console, and the shared flag definitions (what the sampling
flags mean: `sample_settings`). Everything here checks its input before any work, with a `UsageError` that names
the flag.
"""
import logging as std_logging
import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging
import jax

from ddpm_ip_jax import config_validation
from ddpm_ip_jax import fileio
from ddpm_ip_jax import interrupts
from ddpm_ip_jax import runtime
from ddpm_ip_jax import sampling

FLAGS = flags.FLAGS
flags.DEFINE_string("compilation_cache_dir", None,
                    "JAX's persistent compilation cache: a folder, 'auto' (~/.cache/ddpm_ip_jax/xla, or "
                    "JAX_COMPILATION_CACHE_DIR) or 'none' (off). Default: config.compilation_cache_dir where the "
                    "command has a --config, else 'auto'.")


# ---------------------------------------------------------------------------------------------------------------
# A quiet console
# ---------------------------------------------------------------------------------------------------------------

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_KEPT_LIBRARY_INFO = (f"clu{os.sep}parameter_overview.py",)  # the parameter table at the start of a run


# orbax logs several long INFO records per save and, when a write fails, the same error with its traceback from
# each of its background threads (and asyncio, at exit, the write tasks "never retrieved"); the failure itself
# reaches the caller as an exception, which the commands report in one line. So nothing of orbax or asyncio (which
# only orbax's and gcsfs's background loops use here) reaches the console without --verbosity.
_SILENT_LIBRARIES = (f"{os.sep}orbax{os.sep}", f"{os.sep}asyncio{os.sep}")
# gcsfs warns on every request without credentials for the bucket-type lookup ("Could not determine bucket
# type ..."): hundreds of lines per checkpoint against an emulator or a public bucket. Each such text once.
_ONCE_LIBRARIES = (f"{os.sep}gcsfs{os.sep}",)


class _OwnInfoOnly(std_logging.Filter):
  """Lets through warnings and errors from everywhere but orbax, INFO and below only from this package (and
  the parameter overview), unless absl's --verbosity is 1 or more: jax and etils log their start-up, orbax its
  saves, which would bury the one line per log interval. gcsfs's warnings come once per text."""

  def __init__(self):
    super().__init__()
    self._said = set()

  def filter(self, record):
    if logging.get_verbosity() >= 1:
      return True
    path = record.pathname or ""
    if any(lib in path for lib in _SILENT_LIBRARIES):
      return False
    if any(lib in path for lib in _ONCE_LIBRARIES):
      text = record.getMessage()
      if text in self._said:
        return False
      self._said.add(text)
    return (record.levelno >= std_logging.WARNING or path.startswith(_PACKAGE_DIR)
            or path.endswith(_KEPT_LIBRARY_INFO))


def _drop_closed_event_loop_reports(default_hook):
  """An unraisable-exception hook that drops 'Event loop is closed' RuntimeErrors (asyncio callbacks of
  orbax's and gcsfs's background loops that outlive them at exit; harmless) unless --verbosity >= 1."""

  def hook(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)
        and logging.get_verbosity() < 1):
      return
    default_hook(unraisable)

  hook.quiet = True
  return hook


def quiet_library_logs():
  """Installs `_OwnInfoOnly` on absl's handler and the closed-event-loop filter (idempotent); the commands
  call it first thing."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())
  if not getattr(sys.unraisablehook, "quiet", False):
    sys.unraisablehook = _drop_closed_event_loop_reports(sys.unraisablehook)


# ---------------------------------------------------------------------------------------------------------------
# One line for bad input
# ---------------------------------------------------------------------------------------------------------------

# What bad input, a missing file or a damaged checkpoint raise; anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError, KeyError, ImportError)


def fatal_message(error):
  """The one line a command prints for a USER_ERRORS exception: the message of our ValueErrors/ImportErrors as
  it is, the exception's name before the others' (an OSError's text alone hides what failed)."""
  if isinstance(error, KeyError):
    return f"missing key {error}"
  text = str(error).strip()
  return text if isinstance(error, (ValueError, ImportError)) or not text else f"{type(error).__name__}: {text}"


def run(main, **kwargs):
  """`app.run(main)` that turns a UsageError or USER_ERRORS into one 'FATAL <message>' line and exit code 1 (the
  traceback with --verbosity=1). The checks of each command run before any work, so the line comes before hours
  of sampling. A Ctrl-C or SIGTERM (`interrupts`) ends in one 'interrupted (SIGINT): <what is kept>.' line and
  exit code 128 + the signal's number, without a traceback."""

  def guarded(argv):
    quiet_library_logs()
    _set_up_process()
    try:
      check_path_flags()
      check_seeds()
      check_urls()
      return main(argv)
    except app.UsageError as e:  # absl would print the module's docstring before it
      sys.exit(f"FATAL {e}")
    except USER_ERRORS as e:
      if logging.get_verbosity() >= 1:
        raise
      sys.exit(f"FATAL {fatal_message(e)} (--verbosity=1 shows the traceback)")
    except KeyboardInterrupt as e:  # a stop between batches (interrupts.Interrupted), or a Ctrl-C outside one
      signum = getattr(e, "signum", signal.SIGINT)
      print(interrupts.line(signum, getattr(e, "kept", None)), file=sys.stderr, flush=True)
      sys.exit(interrupts.exit_code(signum))

  app.run(guarded, **kwargs)


def _set_up_process():
  """The CPU device count (dividing the training batch of a --config) and the compilation cache, before JAX
  starts its backend (`runtime`); says once what the CPU defaults set."""
  config = FLAGS["config"].value if "config" in FLAGS else None
  training = getattr(config, "training", None)
  batch_size = getattr(training, "batch_size", None)
  said = runtime.set_cpu_devices(batch_size if isinstance(batch_size, int) and batch_size > 0 else None)
  if said:
    logging.info("%s", said)
  cache = FLAGS.compilation_cache_dir
  if cache is None:
    cache = str(config.get("compilation_cache_dir", "auto")) if config is not None else "auto"
  runtime.enable_compilation_cache(cache)


# The path flags of the commands; '' (`--workdir=$UNSET`) would mean the current directory.
_PATH_FLAGS = ("workdir", "output_dir", "output", "docs")  # where a command writes


def empty_path_message(name):
  """What a command says of the path flag --`name` given empty."""
  return f"--{name} is empty (--{name}= with nothing after it, e.g. an unset shell variable); give a path."


def check_path_flags():
  """UsageError for a path flag of the command given empty (`--workdir=` from an unset shell variable), which
  would otherwise write into the current directory."""
  for name in _PATH_FLAGS:
    if name in FLAGS and FLAGS[name].value is not None and not str(FLAGS[name].value).strip():
      raise app.UsageError(empty_path_message(name))


def check_seeds():
  """UsageError naming the flag for a seed of the command (--seed, each of --seeds, --config.seed) that is not an
  integer in [0, config_validation.MAX_SEED] (what jax.random.key takes): before any work, not as an OverflowError
  inside jax.random.key hours later."""
  given = []
  if "seed" in FLAGS:
    given.append(("--seed", FLAGS["seed"].value))
  if "seeds" in FLAGS:
    given += [("--seeds", v) for v in FLAGS["seeds"].value or ()]
  config = FLAGS["config"].value if "config" in FLAGS else None
  if config is not None and hasattr(config, "get") and config.get("seed") is not None:
    given.append(("--config.seed", config.get("seed")))
  for name, value in given:
    try:
      seed = int(value)
    except (TypeError, ValueError):
      continue  # not a number at all: the command's own parsing names it
    if not 0 <= seed <= config_validation.MAX_SEED or isinstance(value, (bool, float)):
      raise app.UsageError(f"{name}={value}: a seed must be an integer in [0, 2**63 - 1] (jax.random.key takes a "
                           "signed 64-bit integer).")


def _strings(node, prefix):
  """(name, value) of every string (or string in a list) under a flag value or a config."""
  if isinstance(node, str):
    yield prefix, node
  elif isinstance(node, (list, tuple)):
    for item in node:
      yield from _strings(item, prefix)
  elif hasattr(node, "items"):  # a ConfigDict
    for key, value in node.items():
      yield from _strings(value, f"{prefix}.{key}")


def check_urls():
  """Every flag and config field holding a URL names one this project can use (`fileio.check_url`), and each
  bucket answers one request within seconds (`fileio.probe_url`): before any work, in one line naming the field."""
  named = []
  for name in FLAGS:
    flag = FLAGS[name]
    if flag.present or name == "config":  # the config's fields, given in the file or as overrides
      named += [(f"--{what}", v) for what, v in _strings(flag.value, name) if fileio.is_url(v)]
  buckets = {}
  for what, url in named:
    fileio.check_url(url, what)
    buckets.setdefault(url.split("://", 1)[1].split("/", 1)[0], (what, url))
  for what, url in buckets.values():
    fileio.probe_url(url, what)


def check_writable(directory, what):
  """Creates `directory` and writes and deletes a probe file there, before any work; UsageError naming `what`.
  The probe's name is the process's own: the processes of a multi-host run probe the same shared directory."""
  probe = fileio.join(directory, f".write_probe_{jax.process_index()}_{os.getpid()}")
  try:
    fileio.makedirs(directory)
    fileio.write_text(probe, "")
    fileio.remove(probe)
  except OSError as e:
    raise app.UsageError(f"{what} {directory} cannot be written: {e}") from None


def check_config_file(argv):
  """--config=PATH[:ARG] names a config file that loads (`load_config_file`); one FATAL line otherwise, before
  config_flags runs it (its errors are tracebacks). Without --config, the command's default file (the study's)."""
  given = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
  if not given and "--config" not in argv and "config" in FLAGS:
    # The default path as given to DEFINE_config_file; config_flags' own config_filename raises before parsing.
    default = FLAGS["config"].default_unparsed
    given = [default] if isinstance(default, str) and default else []
  for spec in given:
    try:
      load_config_file(spec)
    except ValueError as e:
      sys.exit(f"FATAL {e}")


# ---------------------------------------------------------------------------------------------------------------
# Multi-host start-up
# ---------------------------------------------------------------------------------------------------------------

def define_distributed_flags():
  flags.DEFINE_bool("distributed", False,
                    "Call jax.distributed.initialize() first (multi-host; auto-detects TPU pods and SLURM).")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0's coordinator, for --distributed where it is not auto-detected.")
  flags.DEFINE_integer("num_processes", None, "Number of processes, for --distributed.")
  flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes), for --distributed.")


def initialize_distributed():
  """jax.distributed.initialize() with the coordinates given by flags (None: auto-detected). Must run
  before any other JAX call."""
  given = {name: FLAGS[name].value for name in ("coordinator_address", "num_processes", "process_id")
           if FLAGS[name].value is not None}
  if given and not FLAGS.distributed:
    raise app.UsageError(f"--{', --'.join(given)} only apply with --distributed=true.")
  if FLAGS.distributed:
    jax.distributed.initialize(**given)
    if runtime.no_cache_across_cpu_processes():
      logging.info("Compilation cache off: a CPU run of several processes compiles its programs at every start "
                   "(runtime.no_cache_across_cpu_processes).")


# ---------------------------------------------------------------------------------------------------------------
# --config overrides
# ---------------------------------------------------------------------------------------------------------------

def _first_line(error):
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def load_config_file(spec, flag="--config"):
  """The ConfigDict of `get_config()` of the config file `spec`, PATH or PATH:ARG (then `get_config(ARG)`), as
  config_flags runs it; a ValueError naming `flag`, the file and what is wrong for a missing file, one that does
  not run (a syntax error, an exception), one without get_config, a get_config that does not take ARG (or needs
  one) or that raises, and a result that is not a ConfigDict."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import inspect  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  path, colon, arg = spec.partition(":")
  args = (arg,) if colon else ()
  where = f"{flag}={path}"
  if not os.path.isfile(path):
    raise ValueError(f"{where}: no such file (the configs are configs/*.py).")
  try:
    module_spec = importlib.util.spec_from_file_location("_config_for_override_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ValueError(f"{where}: a syntax error at line {e.lineno}: {e.msg}.") from None
  except Exception as e:  # pylint: disable=broad-except  # the file is Python: anything it raises, in one line
    raise ValueError(f"{where}: the file fails when it runs ({_first_line(e)}).") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ValueError(f"{where} defines no get_config() (a config file's get_config() returns its ConfigDict).")
  try:
    inspect.signature(get_config).bind(*args)
  except TypeError:
    signature = f"its get_config{inspect.signature(get_config)}"
    if colon:
      raise ValueError(f"{flag}={spec}: {signature} cannot take the argument {arg!r} (the text after ':').") from None
    raise ValueError(f"{flag}={spec}: {signature} needs an argument: give {flag}={path}:ARG.") from None
  except ValueError:  # no signature to inspect (a builtin): let the call tell
    pass
  try:
    config = get_config(*args)
  except Exception as e:  # pylint: disable=broad-except  # as above
    raise ValueError(f"{flag}={spec}: get_config({', '.join(map(repr, args))}) fails ({_first_line(e)}).") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"{flag}={spec}: get_config() returned {type(config).__name__}, not an "
                     "ml_collections.ConfigDict.")
  return config


def _unknown_override(argv):
  """The first --config.<path> of argv that names no field of the config file, as a message."""
  config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_path is None:
    return None
  config = load_config_file(config_path)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node, walked = config, "config"
    for name in path.split("."):
      fields = node.keys() if hasattr(node, "keys") else []
      if name not in fields:
        return (f"Unknown config override {arg.split('=', 1)[0]}: {walked} has no field {name!r}. "
                f"Its fields: {', '.join(sorted(fields))}.")
      node, walked = node[name], f"{walked}.{name}"
  return None


def parse_flags(argv):
  """absl flag parsing that turns a missing config file or an override of a missing config field into a
  one-line error."""
  check_config_file(argv)
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    message = _unknown_override(argv) or f"Bad --config override: {e}"
    sys.exit(f"FATAL {message}")


# ---------------------------------------------------------------------------------------------------------------
# Where the model comes from, and how the chain runs (sample, evaluate, exposure_bias; read by sample_settings)
# ---------------------------------------------------------------------------------------------------------------

def define_model_flags():
  flags.DEFINE_string("workdir", None, "Training workdir (model source unless --checkpoint); output goes to "
                      "<workdir>/samples_<settings> unless --output_dir.")
  flags.DEFINE_string("checkpoint", None, "A converted checkpoint DIR (python -m ddpm_ip_jax.convert).")
  flags.DEFINE_bool("use_ema", None, "Use the EMA params (a training workdir only; default: the run's "
                    "config.sampling.use_ema).")
  flags.DEFINE_float("ema_rate", None, "Which EMA rate (default: the first in the checkpoint).")


def define_sampler_flags():
  """The chain's settings; each defaults to the run's config.sampling."""
  flags.DEFINE_enum("sampler", None, sampling.SAMPLERS, "Ancestral (DDPM) or DDIM (default: config.sampling).")
  flags.DEFINE_string("steps", None, "Respacing: '' (all steps), '100', '10,20,5', 'ddim50' (default: "
                      "config.sampling.timestep_respacing).")
  flags.DEFINE_float("eta", None, "DDIM eta (default: config.sampling.eta).")
  flags.DEFINE_bool("clip_denoised", None, "Clip the predicted x0 to [-1, 1] at each step (default: "
                    "config.sampling.clip_denoised).")
  flags.DEFINE_list("eps_scale", None, "Epsilon scaling 'k,b': eps / (k t + b) at sampling time (default off).")
  flags.DEFINE_integer("seed", 0, "Sample i is drawn from fold_in(key(seed), i).")


def define_sample_flags():
  """The sample command's flags (also the evaluation command's)."""
  define_model_flags()
  define_sampler_flags()
  flags.DEFINE_string("output_dir", None, "Where to write the samples.")
  flags.DEFINE_integer("num_samples", 50_000, "How many samples.")
  flags.DEFINE_integer("batch_size", 64, "Samples per device per call.")
  flags.DEFINE_list("labels", None, "Class-conditional models: the classes to sample, cycled over the sample "
                    "indices (e.g. 3, or 0,1,2); default: uniform over the classes. Saved as arr_1.")
