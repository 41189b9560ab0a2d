"""The names of the feature networks the metrics can use: the FID InceptionV3 and the digits classifier. No other
import, so that checking a config or defining a flag loads neither network (`scoring.make_extractor` builds one)."""

EXTRACTORS = ("inception", "digits")
