"""The feature networks the metrics can use, by name: the FID InceptionV3 and the digits classifier."""
from ddpm_ip_jax.evaluation import metrics

EXTRACTORS = ("inception", "digits")


def make_extractor(kind, weights):
  """The feature extractor `kind` with its user-supplied weights file (never downloaded)."""
  if kind == "inception":
    return metrics.inception_extractor(weights)
  if kind == "digits":
    from ddpm_ip_jax.evaluation import digits  # pylint: disable=import-outside-toplevel
    return digits.digits_extractor(weights)
  raise ValueError(f"unknown feature extractor {kind!r}; expected one of {EXTRACTORS}")
