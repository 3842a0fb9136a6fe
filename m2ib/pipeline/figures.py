"""Pictures people look at: images with each method's attribution heatmap and true boxes, and the
caption's tokens shaded by their scores."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from m2ib.core.figures import plt, save_figure
from m2ib.core.maps import normalise_minmax_array


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
        s = normalise_minmax_array(scores)
        x = 0.0
        for word, v in zip(words, s):
            ax_txt.text(x, 0.5, word, fontsize=8, va="center",
                        bbox=dict(facecolor=plt.cm.Reds(0.15 + 0.85 * v), edgecolor="none", pad=1.5))
            x += 0.06 + 0.04 * len(word)
        ax_txt.set_xlim(0, max(x, 1.0))


def method_grid(path, adapter, samples, attributions: dict, n: int = 4) -> Path:
    """Rows = methods, columns = the first n samples: each image with the method's heatmap and true
    boxes, the caption's word tokens shaded by the method's token scores underneath."""
    samples = samples[:n]
    images = adapter.to_display(adapter.preprocess([s.image for s in samples]))
    boxes = [adapter.box_to_input_frame(s.boxes, s.image.size) for s in samples]
    rows = len(attributions)
    fig, axes = plt.subplots(2 * rows, len(samples), figsize=(2.4 * len(samples), 2.9 * rows),
                             gridspec_kw={"height_ratios": [5, 1] * rows}, squeeze=False)
    for r, (name, att) in enumerate(attributions.items()):
        for c in range(len(samples)):
            heat = None if att.image is None else att.image[c].numpy()
            words, scores = [], []
            if att.text is not None:
                for j in att.token_mask[c].nonzero().flatten().tolist():
                    words.append(att.tokens[c][j])
                    scores.append(float(att.text[c, j]))
            title = f"{name}\n{samples[c].caption}" if c == 0 else samples[c].caption
            plot_pair(axes[2 * r, c], axes[2 * r + 1, c], images[c], heat, words, scores, boxes[c], title)
    fig.tight_layout()
    return save_figure(fig, path)
