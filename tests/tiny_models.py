"""Tiny offline models for the tests: a BiomedCLIP-shaped open_clip config (timm ViT + HF BERT)."""
import json
from pathlib import Path


TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "of", "in", "on", "and",
              "is", "there", "left", "right", "lower", "upper", "lung", "lobe", "small", "large",
              "opacity", "effusion", "pleural", "heart", "red", "green", "blue", "circle", "square",
              "dog", "cat", "photo", "##s", "##ing", "##ed", "##al", "."]


def write_tiny_hf_model(folder, name: str = "m2ib-tiny-timm-bert", timm_pool: str = "",
                        pooler: str = "cls_last_hidden_state_pooler", context_length: int = 24) -> Path:
    """Write, fully offline, a tiny BiomedCLIP-shaped open_clip config into `folder`:
    `folder/<name>.json` (timm 'test_vit' trunk, 160 px, 6 blocks) whose text tower points at
    `folder/tiny-bert/` (a 3-layer BertConfig + a WordPiece vocab.txt). Returns the JSON path;
    register it with open_clip.add_model_config(path) and build with pretrained_text=False."""
    folder = Path(folder)
    bert = folder / "tiny-bert"
    bert.mkdir(parents=True, exist_ok=True)
    (bert / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    (bert / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}), encoding="utf-8")
    from transformers import BertConfig
    BertConfig(vocab_size=len(TINY_VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64, pad_token_id=0).save_pretrained(bert)
    cfg = {"embed_dim": 16,
           "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": timm_pool,
                          "timm_proj": "linear", "image_size": 160},
           "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "mlp",
                        "hf_pooler_type": pooler, "context_length": context_length}}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return path


# ---- tiny random adapters, one per family (the method x family matrix, tests/test_method_matrix.py) ------
def tiny_open_clip_vit(folder):
    from m2ib.models.sources import load_adapter
    return load_adapter("m2ib-tiny-vit", pretrained=None, seed=0)


def tiny_timm_bert(folder):
    import open_clip
    from m2ib.models.offline import hub_offline_mode
    from m2ib.models.sources import load_adapter
    open_clip.add_model_config(write_tiny_hf_model(folder, name="m2ib-tiny-family-timm-bert"))
    with hub_offline_mode(True):
        return load_adapter("m2ib-tiny-family-timm-bert", pretrained=None, seed=0)


def activate_resnet_branches(adapter, seed: int = 0) -> None:
    """open_clip initialises every ResNet bottleneck's last BatchNorm weight to zero, so in a random
    ModifiedResNet each residual branch outputs 0 and only the shortcuts act; redraw all BatchNorm
    weights, biases and running statistics (seeded) so that every convolution shapes the output."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapter.model.visual.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def tiny_open_clip_resnet(folder):
    """m2ib/model_configs/m2ib-tiny-resnet.json: ModifiedResNet layers [1, 1, 1, 1], width 16, 64 px.
    Seed 1: the matrix's pairs get a positive similarity (seed 0 gives both a negative one, and Grad-CAM's
    ReLU then zeroes the whole map, which is correct but tests nothing)."""
    from m2ib.models.sources import load_adapter
    adapter = load_adapter("m2ib-tiny-resnet", pretrained=None, seed=1)
    activate_resnet_branches(adapter, seed=1)
    return adapter


#: adapter family -> builder(tmp folder) of a tiny random adapter of it. Adding a family = one line here.
TINY_FAMILIES = {
    "open_clip_vit": tiny_open_clip_vit,
    "open_clip_hf": tiny_timm_bert,
    "open_clip_resnet": tiny_open_clip_resnet,
}
