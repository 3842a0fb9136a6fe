"""Tiny offline models for the tests, one per adapter family (TINY_FAMILIES at the end): open_clip ViT,
BiomedCLIP-shaped timm ViT + HF BERT, open_clip ModifiedResNet, transformers CLIP, and SigLIP- / EVA02-shaped
timm image towers with an open_clip text tower."""
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


def write_tiny_hf_clip(folder, seed: int = 0, hidden_act: str = "gelu") -> Path:
    """Write, fully offline, a tiny random transformers CLIPModel shaped like m2ib-tiny-vit (ViT 32 px, patch 8,
    width 64, 3 layers, 2 heads; text width 32, 3 layers, 2 heads, 77 positions; embedding 32) into `folder`
    with `save_pretrained`: config + weights, a CLIPTokenizer built from open_clip's BPE vocabulary (so both
    libraries give the same ids) and a 32 px CLIPImageProcessor. Returns the folder."""
    import torch
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    folder = Path(folder)
    bpe = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}    # HF's names
    vocab = {rename.get(t, t): i for t, i in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=hidden_act,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act=hidden_act),
        projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


# ---- timm image towers + open_clip text tower (SigLIP- and EVA02-shaped) ---------------------------
#: Tiny timm trunks: timm's own architectures (vit_base_patch16_siglip_224: no class token,
#: attention-pool head 'map'; eva02_base_patch16_clip_224: class token, separate q/k/v, SwiGLU MLP with
#: norm, attention scale norm, rotary position embedding; eva02_base_patch14_224 with layer scale: fused
#: qkv with q/v biases, gamma_1/gamma_2) at 64 px, patch 8, width 32, 3 blocks.
TINY_TIMM_TRUNKS = {
    "m2ib_tiny_siglip_vit": ("vit_base_patch16_siglip_224", {}),
    "m2ib_tiny_eva02": ("eva02_base_patch16_clip_224", dict(ref_feat_shape=(8, 8))),
    "m2ib_tiny_eva_fused": ("eva02_base_patch14_224", dict(ref_feat_shape=(8, 8), init_values=0.1)),
}
TINY_SIGLIP_WORDS = ["a", "the", "of", "in", "on", "red", "green", "blue", "circle", "square", "dog", "cat",
                     "photo", "left", "right", "small", "large", "lung", "opacity"]


def register_tiny_timm_trunks() -> None:
    """Make TINY_TIMM_TRUNKS known to timm.create_model (what open_clip's TimmModel calls); idempotent."""
    import timm
    from timm.models import register_model

    def entry(name, base, args):
        def build(pretrained=False, **kwargs):
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kwargs.pop(key, None)
            tiny = dict(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, **args)
            return timm.create_model(base, pretrained=False, **{**tiny, **kwargs})
        build.__name__ = name
        return build

    for name, (base, args) in TINY_TIMM_TRUNKS.items():
        if not timm.is_model(name):
            register_model(entry(name, base, args))


def write_tiny_siglip_tokenizer(folder) -> Path:
    """A word-level Hugging Face tokenizer with SigLIP's layout (no start token, words, '</s>', padded
    with '</s>'), saved to `folder` so open_clip's HFTokenizer loads it offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *TINY_SIGLIP_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder = Path(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="<unk>",
                            model_max_length=16).save_pretrained(folder)
    return folder


def write_tiny_timm_tower_models(folder) -> dict[str, Path]:
    """Register the tiny trunks and write open_clip configs shaped like ViT-B-16-SigLIP (timm_pool 'map',
    timm_proj 'none', text: no causal mask, last-position pooling, projection with bias, an HF tokenizer
    with canonicalize cleaning) and EVA02-B-16 (timm_pool 'token', no extra projection, causal CLIP
    text tower with open_clip's BPE tokenizer). Returns {config name: JSON path}; register each with
    open_clip.add_model_config(path)."""
    register_tiny_timm_trunks()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = write_tiny_siglip_tokenizer(folder / "tiny-siglip-tokenizer")
    text = dict(width=32, heads=2, layers=3)
    configs = {
        "m2ib-tiny-siglip": {
            "embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
            "vision_cfg": {"image_size": 64, "timm_model_name": "m2ib_tiny_siglip_vit", "timm_model_pretrained": False,
                           "timm_pool": "map", "timm_proj": "none"},
            "text_cfg": {"context_length": 16, "vocab_size": 3 + len(TINY_SIGLIP_WORDS),
                         "hf_tokenizer_name": str(tok_dir), "tokenizer_kwargs": {"clean": "canonicalize"}, **text,
                         "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}},
        "m2ib-tiny-eva02": {
            "embed_dim": 24, "custom_text": True,
            "vision_cfg": {"image_size": 64, "timm_model_name": "m2ib_tiny_eva02", "timm_model_pretrained": False,
                           "timm_pool": "token", "timm_proj": None},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, **text}},
        "m2ib-tiny-eva-fused": {
            "embed_dim": 24, "custom_text": True,
            "vision_cfg": {"image_size": 64, "timm_model_name": "m2ib_tiny_eva_fused", "timm_model_pretrained": False,
                           "timm_pool": "avg", "timm_proj": "linear"},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, **text}},
    }
    paths = {}
    for name, cfg in configs.items():
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return paths


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


def tiny_hf_clip(folder):
    from m2ib.models.offline import hub_offline_mode
    from m2ib.models.sources import load_adapter
    with hub_offline_mode(True):
        return load_adapter(f"hf:{write_tiny_hf_clip(Path(folder) / 'clip')}")


def _tiny_timm_tower(folder, name: str):
    import open_clip
    from m2ib.models.offline import hub_offline_mode
    from m2ib.models.sources import load_adapter
    open_clip.add_model_config(write_tiny_timm_tower_models(folder)[name])
    with hub_offline_mode(True):
        return load_adapter(name, pretrained=None, seed=0)


def tiny_siglip(folder):
    """SigLIP-shaped: no class token, attention-pool head; bidirectional text pooling the last position."""
    return _tiny_timm_tower(folder, "m2ib-tiny-siglip")


def tiny_eva02(folder):
    """EVA02-shaped: timm Eva (class token, RoPE) + causal CLIP text tower."""
    return _tiny_timm_tower(folder, "m2ib-tiny-eva02")


#: '<adapter family>' or '<adapter family>-<shape>' -> builder(tmp folder) of a tiny random adapter of it.
#: Adding a family = one line here.
TINY_FAMILIES = {
    "open_clip_vit": tiny_open_clip_vit,
    "open_clip_hf": tiny_timm_bert,
    "open_clip_resnet": tiny_open_clip_resnet,
    "hf_clip": tiny_hf_clip,
    "open_clip_timm-siglip": tiny_siglip,
    "open_clip_timm-eva02": tiny_eva02,
}
