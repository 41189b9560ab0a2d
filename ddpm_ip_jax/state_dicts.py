"""Reading PyTorch state_dicts: a plain `torch.save(state_dict)` file (.pt/.pth, needs torch) or the same
tensors in an `.npz` keyed by state_dict name (no torch needed). Arrays keep PyTorch's layouts."""
import io

from etils import epath

from ddpm_ip_jax import fileio


def read_state_dict(path, *, what="checkpoint", help_text=""):
  """{state_dict name: numpy array} of `path`; `what` and `help_text` go into the error messages."""
  path = epath.Path(fileio.absolute(path))  # a local path or a URL (gs://...)
  if not path.is_file():
    raise FileNotFoundError(f"{what} file not found: {path}. {help_text}".strip())
  if path.suffix == ".npz":
    state = fileio.load_npz_checked(str(path), f"the {what} file", hint=help_text)
    bad = sorted(k for k, v in state.items() if v.dtype.kind not in "fiub")
    if bad:
      raise fileio.DamagedFileError(f"the {what} file {path} holds arrays that are not numbers: {', '.join(bad)}.")
    return state
  if path.suffix in (".pt", ".pth"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(f"reading {path} needs torch: pip install .[torch] (or convert it to .npz where torch "
                        f"is installed). {help_text}".strip()) from e
    try:
      state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except  # torch raises many kinds for a file it cannot read
      raise ValueError(f"{path} cannot be read as a PyTorch {what} file ({type(e).__name__}): that is a "
                       "torch.save() of a state_dict of tensors, as the reference's training writes them.") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
      raise ValueError(f"{path} is not a plain state_dict ({{name: tensor}}); a {what} file must be one.")
    return {k: v.detach().cpu().numpy() for k, v in state.items()}
  raise ValueError(f"unknown {what} format {path.suffix!r} for {path}: expected .pt, .pth or .npz.")
