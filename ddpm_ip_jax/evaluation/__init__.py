"""Sample evaluation (docs/method.md section 5): the FID InceptionV3 in Flax and FID, sFID, Inception Score,
precision/recall over any feature extractor."""
from ddpm_ip_jax.evaluation.inception import (WEIGHTS_HELP, InceptionV3, InceptionWeightsError,
                                              load_inception_params)
from ddpm_ip_jax.evaluation.metrics import (FeatureExtractor, ReferenceStatistics, compute_statistics,
                                            evaluate, extract_features, frechet_distance,
                                            inception_extractor, inception_score, knn_radii,
                                            precision_recall, reference_statistics, sfid)

__all__ = ["WEIGHTS_HELP", "InceptionV3", "InceptionWeightsError", "load_inception_params",
           "FeatureExtractor", "ReferenceStatistics", "compute_statistics", "evaluate",
           "extract_features", "frechet_distance", "inception_extractor", "inception_score", "knn_radii",
           "precision_recall", "reference_statistics", "sfid"]
