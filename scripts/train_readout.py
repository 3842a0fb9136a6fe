"""Train (once per model and settings) the readout bottlenecks that method `m2ib_readout` loads.

For each modality: the readout's cache file (m2ib/method/readout.py, keyed by the model's weights and
every readout setting) is kept if present, else the training pairs (method.m2ib_readout train_data /
train_split / train_pairs) are loaded and the readout is trained on CPU (progress bar, one log line)
and cached. --retrain trains again even when cached. Deterministic: the same machine and thread count
give the same weights bit for bit.

    python scripts/train_readout.py                                   # embedded model, conf defaults
    python scripts/train_readout.py --model tiny --retrain image_alpha=token image_read_layers=[0,1]
"""
from __future__ import annotations

import argparse
import logging

import torch

from m2ib.pipeline.readout import conf_adapter, conf_hparams, ensure_readouts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="a conf/model/<name>.yaml (default: embedded)")
    p.add_argument("--modalities", nargs="+", default=["image", "text"])
    p.add_argument("--retrain", action="store_true", help="train even when a cached readout exists")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*", help="key=value m2ib_readout settings (YAML values)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    adapter = conf_adapter(args.model, args.device)
    trained = ensure_readouts(adapter, conf_hparams(args.overrides), args.modalities, args.retrain)
    for modality, (path, seconds) in trained.items():
        print(f"{modality}: " + (f"cached {path}" if seconds is None else
                                 f"trained in {seconds:.0f} s ({torch.get_num_threads()} threads) -> {path}"))


if __name__ == "__main__":
    main()
