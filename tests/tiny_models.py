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
