"""m2ib-bench: attribution methods (M2IB and its rivals) on CLIP-like models, scored and tabulated.

Layers, bottom to top (tests/test_architecture.py keeps the direction):
  m2ib.core      records, errors, registries, the seed rule, map normalisation, the Attributor/Metric contracts
  m2ib.models    model adapters and model sources (the only code that reads model internals)
  m2ib.data      data sets (imports only m2ib.core)
  m2ib.method    the M2IB method; baselines/ and metrics/ sit beside it
  m2ib.pipeline  configured runs, the attribution cache, tables, figures
  m2ib.api       explain()
"""
__version__ = "0.2.0"
