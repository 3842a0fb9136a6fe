"""Train the embedded benchmark's small open_clip ViT on the generated training split, on CPU, deterministically.

Recipe (not a pure CLIP; see /work/shared/DESIGN.md, "Lessons from training a tiny CLIP on shapes"):
  A. warm-up: the image tower + a throw-away linear head learn a multi-label task (which of the
     colour x shape x size combinations are in the image). Plain contrastive training from scratch
     learnt colour but not shape in the CPU budget.
  B. LiT (Zhai et al., CVPR 2022): image tower locked, the text tower learns the contrastive loss.
  C. joint contrastive training of both towers at a lower learning rate.
The contrastive loss is CLIP's symmetric InfoNCE (Radford et al. 2021) with one change: an in-batch
caption that describes an object PRESENT in another image is not used as a negative for it (the
generator guarantees many such collisions; they are false negatives, not errors).
Writes m2ib/assets/embedded/: the fp16 checkpoint, its sha256, training_log.json, quality.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from m2ib.data import embedded
from m2ib.models import embedded as model_assets
from m2ib.data.embedded_quality import masking_effect, retrieval_at_1
from m2ib.data.generator import COLOURS, SHAPES, SIZES

CLASSES = [(c, s, z) for c in COLOURS for s in SHAPES for z in SIZES]


def targets_and_labels(samples):
    """Multi-hot object labels per image, and each caption's (colour, shape, size-or-None) description."""
    index = {k: i for i, k in enumerate(CLASSES)}
    labels = torch.zeros(len(samples), len(CLASSES))
    present = []   # per image: set of (colour, shape, size)
    for i, s in enumerate(samples):
        objs = {(o["colour"], o["shape"], o["size"]) for o in s.meta["objects"]}
        present.append(objs)
        for o in objs:
            labels[i, index[o]] = 1.0
    desc = [(s.meta["target"][0], s.meta["target"][1], s.meta["target"][2] if s.meta["size_in_caption"] else None)
            for s in samples]
    # described[i, k]: caption i is compatible with class k
    described = torch.zeros(len(samples), len(CLASSES))
    for i, (c, sh, z) in enumerate(desc):
        for k, (c2, s2, z2) in enumerate(CLASSES):
            if c == c2 and sh == s2 and (z is None or z == z2):
                described[i, k] = 1.0
    return labels, described


def patch_labels(samples, grid: int, size: int):
    """(N, grid*grid) class index (len(CLASSES) = background) of the object box covering each patch centre."""
    from m2ib.geometry import boxes_to_input_frame
    index = {k: i for i, k in enumerate(CLASSES)}
    out = torch.full((len(samples), grid * grid), len(CLASSES), dtype=torch.long)
    centres = (torch.arange(grid) + 0.5) * (size / grid)
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    cy, cx = cy.flatten(), cx.flatten()
    for i, s in enumerate(samples):
        boxes = boxes_to_input_frame(np.array([o["box"] for o in s.meta["objects"]]), s.image.size, (size, size))
        for o, (x, y, w, h) in zip(s.meta["objects"], boxes):
            inside = (cx >= x) & (cx < x + w) & (cy >= y) & (cy < y + h)
            out[i, inside] = index[(o["colour"], o["shape"], o["size"])]
    return out


def clip_loss(img, txt, scale, false_neg):
    """Symmetric InfoNCE; false_neg[i, j] True = caption j describes something in image i (j != i)."""
    logits = scale * img @ txt.t()
    logits = logits.masked_fill(false_neg, float("-inf"))
    target = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads: 1 keeps results repeatable and avoids OpenMP stalls on a busy machine")
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--warmup-steps", type=int, default=1000)
    ap.add_argument("--lit-steps", type=int, default=400)
    ap.add_argument("--joint-steps", type=int, default=1200)
    ap.add_argument("--out", type=Path, default=model_assets.ASSET_DIR)
    ap.add_argument("--eval-n", type=int, default=500, help="test pairs used for the quality report")
    args = ap.parse_args(argv)

    import open_clip
    from m2ib.models.sources import register_project_configs

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    register_project_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(model_assets.EMBEDDED_MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(model_assets.EMBEDDED_MODEL_NAME)

    train = embedded.load_embedded_split("train")
    val = embedded.load_embedded_split("val")
    pixels = torch.stack([preprocess(s.image.convert("RGB")) for s in tqdm(train, desc="preprocess")])
    ids = tokenizer([s.caption for s in train])
    labels, described = targets_and_labels(train)
    # compat[i, j]: caption j describes an object present in image i
    compat = (labels @ described.t()) > 0
    n = len(train)
    gen = torch.Generator().manual_seed(args.seed)
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "phases": [], "torch": torch.__version__,
           "open_clip": open_clip.__version__, "python": platform.python_version(),
           "data_seed": embedded.DATA_SEED, "model": model_assets.EMBEDDED_MODEL_NAME}

    def batches(steps):
        order = torch.empty(0, dtype=torch.long)
        for _ in range(steps):
            if len(order) < args.batch:
                order = torch.cat([order, torch.randperm(n, generator=gen)])
            idx, order = order[:args.batch], order[args.batch:]
            yield idx

    def run_phase(name, steps, params, lr, loss_fn):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        t0, losses = time.time(), []
        bar = tqdm(batches(steps), total=steps, desc=name)
        model.train()
        for idx in bar:
            loss = loss_fn(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        model.eval()
        rec = {"phase": name, "steps": steps, "lr": lr, "seconds": round(time.time() - t0, 1),
               "loss_first20": float(np.mean(losses[:20])), "loss_last20": float(np.mean(losses[-20:]))}
        if name != "A_warmup":
            rec["val"] = evaluate(val[:300])
        print(json.dumps(rec), flush=True)
        log["phases"].append(rec)

    def evaluate(samples):
        from m2ib.models.open_clip_vit import OpenClipViTAdapter
        adapter = OpenClipViTAdapter(model, preprocess, tokenizer, name=model_assets.EMBEDDED_MODEL_NAME)
        out = retrieval_at_1(adapter, samples, n_candidates=20, seed=0)
        for p in model.parameters():
            p.requires_grad_(True)
        return out

    # A. supervised warm-up of the image tower (image-level and patch-level object labels)
    grid = model.visual.grid_size[0]
    patches = patch_labels(train, grid, model.visual.image_size[0])
    head = torch.nn.Linear(model.visual.output_dim, len(CLASSES))
    patch_head = torch.nn.Linear(model.visual.transformer.width, len(CLASSES) + 1)
    vis_params = list(model.visual.parameters()) + list(head.parameters()) + list(patch_head.parameters())

    def warm_loss(idx):
        pooled, tokens = model.visual(pixels[idx])
        image_level = F.binary_cross_entropy_with_logits(head(pooled), labels[idx])
        patch_level = F.cross_entropy(patch_head(tokens).flatten(0, 1), patches[idx].flatten())
        return image_level + 0.5 * patch_level

    model.visual.output_tokens = True
    run_phase("A_warmup", args.warmup_steps, vis_params, 2e-3, warm_loss)
    model.visual.output_tokens = False

    def contrastive(idx):
        img = model.encode_image(pixels[idx], normalize=True)
        txt = model.encode_text(ids[idx], normalize=True)
        fn = compat[idx][:, idx] & ~torch.eye(len(idx), dtype=torch.bool)
        return clip_loss(img, txt, model.logit_scale.exp().clamp(max=100), fn)

    # B. LiT: image tower locked
    for p in model.visual.parameters():
        p.requires_grad_(False)
    text_params = [p for n_, p in model.named_parameters() if not n_.startswith("visual.")]
    run_phase("B_lit", args.lit_steps, text_params, 2e-3, contrastive)

    # C. joint
    for p in model.parameters():
        p.requires_grad_(True)
    run_phase("C_joint", args.joint_steps, list(model.parameters()), 1e-3, contrastive)

    # save fp16 state dict in open_clip's checkpoint format
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / f"{model_assets.EMBEDDED_MODEL_NAME}.pt"
    state = {k: v.detach().to(torch.float16) for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "name": model_assets.EMBEDDED_MODEL_NAME, "data_seed": embedded.DATA_SEED}, ckpt)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    (args.out / f"{ckpt.name}.sha256").write_text(f"{digest}  {ckpt.name}\n")
    log["train_seconds"] = round(time.time() - t_start, 1)
    log["checkpoint_sha256"] = digest
    log["checkpoint_bytes"] = ckpt.stat().st_size
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"wrote {ckpt} ({ckpt.stat().st_size / 1e6:.1f} MB, sha256 {digest})")

    # quality of the committed (fp16-rounded) checkpoint, loaded the way users load it
    if args.out == model_assets.ASSET_DIR:
        adapter = model_assets.load_embedded_adapter()
        test = embedded.load_embedded_split("test", limit=args.eval_n)
        quality = {"retrieval": retrieval_at_1(adapter, test, n_candidates=20, seed=0),
                   "masking": masking_effect(adapter, test, seed=0),
                   "checkpoint_sha256": digest,
                   "command": "python scripts/embedded_quality_report.py --n 500 --candidates 20"}
        (args.out / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
        print(json.dumps(quality, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
