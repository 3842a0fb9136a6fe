"""The bottom layer: records (Sample, TextBatch, Attribution), errors, the registry shape, the seed rule,
map normalisation, image input and the Attributor and Metric contracts. Imports nothing else of ours."""
from m2ib.core.errors import (DataUnavailableError, InputError, M2IBError, ModelUnavailableError,
                              UnsupportedError)
from m2ib.core.records import Attribution, Sample, TextBatch, concat_attributions

__all__ = ["Attribution", "Sample", "TextBatch", "concat_attributions", "M2IBError", "InputError",
           "ModelUnavailableError", "DataUnavailableError", "UnsupportedError"]
