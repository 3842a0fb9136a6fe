"""Metrics for attribution maps on CLIP-like models, one module per family: localisation (IoU of
zero-shot detection, pointing game, IBA box ratio, text ratio/AP), confidence (drop / increase), roar
(ROAR+ remove-and-retrain), sanity (cascading randomisation).

Each module registers its metric with @register_metric (m2ib.core.metric): one function
score(attribution, adapter, samples, context, **params) -> per-sample rows, its value columns and how
they are tabulated. Every module here is imported by the metric registry, so a new metric is one module
here plus one conf/metric/*.yaml. Metrics talk to the model only through the ModelAdapter interface.
"""
