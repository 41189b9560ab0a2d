"""Sample evaluation (docs/method.md section 5): the FID InceptionV3 in Flax (`inception`), FID, sFID, Inception
Score, precision/recall over any feature extractor (`metrics`), the digits classifier (`digits`, trained by
`digits_training`) and the scoring of samples against reference statistics kept in files (`scoring`). Importing
the package loads none of them."""
