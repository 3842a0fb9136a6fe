"""Metrics for attribution maps on CLIP-like models, one module per family.

localisation (IoU of zero-shot detection, pointing game, IBA box ratio, text ratio/AP), confidence
(drop / increase), roar (ROAR+ remove-and-retrain), sanity (cascading randomisation). Each takes
Attributions (or an attribution callable, see metrics.attribute) plus the adapter and Samples, talks
to the model only through the ModelAdapter interface, and returns per-sample rows as a DataFrame
with a `sample_id` column; the summarise_* helpers give per-method means.
"""
from m2ib.attributor import pair_seed
from metrics.attribute import AttributeFn, attribute_with, resolve
from metrics.confidence import confidence_scores, summarise_confidence
from metrics.localisation import THRESHOLDS, image_localisation, summarise, text_localisation
from metrics.roar import RoarConfig, roar_plus, summarise_roar
from metrics.sanity import cascading_randomisation, plot_sanity_curve, sanity_table

__all__ = ["AttributeFn", "attribute_with", "pair_seed", "resolve", "confidence_scores", "summarise_confidence",
           "THRESHOLDS", "image_localisation", "summarise", "text_localisation", "RoarConfig", "roar_plus",
           "summarise_roar", "cascading_randomisation", "plot_sanity_curve", "sanity_table"]
