"""Attribution baselines on the shared Attributor interface (gradient, perturbation, attention,
random). Every module here is imported by the method registry (m2ib.core.attributor.METHODS) and
registers its methods by name: a new baseline is one module here plus one conf/method/*.yaml.
All explain the pair's cosine similarity (see base)."""
