"""Pictures people look at: an image with its attribution heatmap and box, and the caption's tokens
shaded by their scores."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def denormalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, H, W) preprocessed tensor -> (H, W, 3) float image in [0, 1]."""
    img = pixels.detach().cpu().float() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def plot_pair(ax_img, ax_txt, image: np.ndarray, heatmap: Optional[np.ndarray], words, scores,
              boxes: Optional[np.ndarray] = None, title: str = "") -> None:
    """Draw one pair: image + heatmap overlay (+ boxes) on ax_img, shaded tokens on ax_txt."""
    ax_img.imshow(image)
    if heatmap is not None:
        ax_img.imshow(heatmap, cmap="jet", alpha=0.45, vmin=0, vmax=max(float(heatmap.max()), 1e-12))
    for x, y, w, h in (boxes if boxes is not None else []):
        ax_img.add_patch(plt.Rectangle((x, y), w, h, fill=False, edgecolor="white", linewidth=1.5))
    ax_img.set_title(title, fontsize=8)
    ax_img.axis("off")
    ax_txt.axis("off")
    if words:
        s = np.asarray(scores, dtype=float)
        s = (s - s.min()) / max(s.max() - s.min(), 1e-12)
        x = 0.0
        for word, v in zip(words, s):
            ax_txt.text(x, 0.5, word, fontsize=8, va="center",
                        bbox=dict(facecolor=plt.cm.Reds(0.15 + 0.85 * v), edgecolor="none", pad=1.5))
            x += 0.035 + 0.022 * len(word)
        ax_txt.set_xlim(0, max(x, 1.0))


def save_examples(path, images, heatmaps, token_lists, score_lists, boxes=None, titles=None) -> Path:
    """A grid with one column per pair: image with heatmap on top, shaded caption below."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 3.2), gridspec_kw={"height_ratios": [5, 1]}, squeeze=False)
    for i in range(n):
        plot_pair(axes[0, i], axes[1, i], images[i], heatmaps[i] if heatmaps is not None else None,
                  token_lists[i], score_lists[i], None if boxes is None else boxes[i],
                  "" if titles is None else titles[i])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
