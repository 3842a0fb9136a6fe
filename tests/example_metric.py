"""An example metric, the way a new one is added: this module (in metrics/, the package imports it by
itself) plus conf/metric/<name>.yaml. tests/test_architecture.py runs it through the whole pipeline."""
import numpy as np
import pandas as pd

from m2ib.core.metric import register_metric


@register_metric("example_peak", columns=("peak",))
def example_peak(attribution, adapter, samples, context, scale: float = 1.0) -> pd.DataFrame:
    """The maximum of each image map times `scale`."""
    peaks = attribution.image.flatten(1).max(1).values.numpy().astype(np.float64) * scale
    return pd.DataFrame({"sample_id": [s.id for s in samples], "method": attribution.method,
                         "modality": "image", "peak": peaks})
