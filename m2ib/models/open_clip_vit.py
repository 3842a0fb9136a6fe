"""Adapter for open_clip models with a ViT image tower and an open_clip text transformer.

Covers open_clip's CLIP (text modules inline) and CustomTextCLIP with a TextTransformer, for any
ViT config: ViT-B-32, ViT-B-16, ViT-L-14 and the small configs this project registers. The text
half (OpenClipTextTower) is shared with open_clip_timm (SigLIP, EVA02: timm image towers).
"""
from __future__ import annotations

import codecs
from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn.functional as F

from m2ib.core.errors import UnsupportedError
from m2ib.core.records import TextBatch
from m2ib.models.base import ModelAdapter, register_family
from m2ib.models.blocks import run_block
from m2ib.models.open_clip_hf import hf_blank_id, is_hf_tokenizer, tokenize_hf


def _text_tower(model, name: str) -> SimpleNamespace:
    """The text encoder's parts, wherever open_clip keeps them."""
    if hasattr(model, "transformer") and hasattr(model, "token_embedding"):   # open_clip CLIP
        t = model
        pool = getattr(model, "text_pool_type", "argmax")
        cls_emb = None
    elif hasattr(model, "text") and hasattr(model.text, "token_embedding"):   # CustomTextCLIP
        t = model.text
        pool = t.pool_type
        cls_emb = t.cls_emb
    else:
        raise UnsupportedError(f"{name}: this open_clip model's text tower is not an open_clip TextTransformer "
                               f"(hf-hub text towers need the open_clip_hf adapter)")
    if getattr(t, "use_pad_mask", False) or cls_emb is not None or pool not in _TEXT_POOLS:
        what = ("a padding mask" if getattr(t, "use_pad_mask", False) else "an appended class token (CoCa)"
                if cls_emb is not None else f"text pooling {pool!r}")
        raise UnsupportedError(f"{name}: open_clip text towers with {what} are not supported (supported: causal or "
                               f"bidirectional towers without padding mask pooling one of {_TEXT_POOLS}); use e.g. "
                               f"ViT-B-16, ViT-B-16-SigLIP or EVA02-B-16")
    return SimpleNamespace(token_embedding=t.token_embedding, positional_embedding=t.positional_embedding,
                           blocks=t.transformer.resblocks, ln_final=t.ln_final, pool=pool,
                           eos_id=getattr(t, "eos_id", None), projection=t.text_projection, attn_mask=t.attn_mask)


def bpe_row_strings(row: Sequence[int], eot: int, decoder: dict, byte_decoder: dict, special) -> list[str]:
    """Display strings of one id row of a byte-level CLIP BPE (open_clip's and HF's CLIPTokenizer share the
    format: byte-to-unicode characters, '</w>' ending a word); `special` are the start/end-of-text ids.

    Each byte-level BPE token gets exactly the characters its bytes complete, so a token holding
    only the leading bytes of a multi-byte character gets '' and the token completing it gets the
    character; the decoder is flushed at the word end ('</w>'). A word's token strings therefore
    concatenate to the word's text, and ASCII tokens read as before. Start/end-of-text tokens keep
    their special strings; positions after the end-of-text token are ''.
    """
    out: list[str] = []
    dec = None      # incremental decoder of the word in progress
    for j, tid in enumerate(row):
        if j > eot:
            out.append("")
            continue
        tok = decoder.get(int(tid), "")
        if tid in special:
            # a word cut by truncation: its incomplete trailing bytes are dropped
            dec = None
            out.append(tok)
            continue
        end = tok.endswith("</w>")
        tok = tok.replace("</w>", "")
        if dec is None:
            dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        data = bytes(byte_decoder.get(c, ord("?")) for c in tok)
        out.append(dec.decode(data, final=end))
        if end:
            dec = None
    return out


#: open_clip text_global_pool types with one pooled position: the highest token id (CLIP's EOT), the
#: first end-of-sequence token, the first position, the last position of the full context (SigLIP).
_TEXT_POOLS = ("argmax", "eos", "first", "last")


def has_open_clip_text(model) -> bool:
    """Whether a built open_clip model's text tower is open_clip's TextTransformer (CLIP keeps it inline)."""
    text = getattr(model, "text", None)
    if text is None:
        return hasattr(model, "transformer")
    return type(text).__name__ == "TextTransformer"


class OpenClipTextTower:
    """The text half of an adapter whose text tower is open_clip's TextTransformer: causal CLIP
    (EOT pooling, open_clip's BPE tokenizer) or bidirectional SigLIP (no causal mask, last-position
    pooling, a Hugging Face SentencePiece tokenizer through open_clip's HFTokenizer).

    A causal tower is run only up to the batch's last pooled/EOT position (later positions cannot
    reach it). A bidirectional tower without a padding mask lets every position of the full context,
    padding included, attend to every other, and SigLIP pools the last (padding) position: it is run
    on the full context, and all its positions are bottleneck positions (token_positions), since all
    of them carry the caption to the pooled one.
    """

    def _init_text_tower(self) -> None:
        self.text = _text_tower(self.model, self.name)
        self.context_length = int(self.text.positional_embedding.shape[0])
        self.text_causal = self.text.attn_mask is not None
        tokenizer = self.tokenizer
        self._hf_tokenizer = is_hf_tokenizer(self.name, tokenizer)
        if self._hf_tokenizer:
            hf_tok = tokenizer.tokenizer
            self.pad_id = int(hf_tok.pad_token_id if hf_tok.pad_token_id is not None else 0)
            self.blank_token_id = hf_blank_id(hf_tok, self.pad_id)
            self._decoder = None
            return
        if not hasattr(tokenizer, "sot_token_id") or not hasattr(tokenizer, "encode"):
            raise UnsupportedError(f"{self.name}: tokenizer {type(tokenizer).__name__} is neither open_clip's BPE "
                                   f"SimpleTokenizer nor its HFTokenizer")
        enc = getattr(tokenizer, "encoder", {})
        self.blank_token_id = int(enc.get("!</w>", 0)) if enc else 0
        self._decoder = getattr(tokenizer, "decoder", None)
        self._byte_decoder = getattr(tokenizer, "byte_decoder", None)

    # ---- inputs -------------------------------------------------------------------------------
    def _token_string(self, tid: int) -> str:
        """One token's display string, decoded alone (a character split over tokens shows as U+FFFD)."""
        if self._decoder is None:
            return str(tid)
        tok = self._decoder.get(int(tid), "")
        if tid in (self.tokenizer.sot_token_id, self.tokenizer.eot_token_id):
            return tok
        tok = tok.replace("</w>", "")
        if self._byte_decoder:
            tok = bytearray(self._byte_decoder.get(c, ord("?")) for c in tok).decode("utf-8", errors="replace")
        return tok

    def _row_strings(self, row: Sequence[int], eot: int) -> list[str]:
        if self._decoder is None or not self._byte_decoder:
            return [self._token_string(t) if j <= eot else "" for j, t in enumerate(row)]
        return bpe_row_strings(row, eot, self._decoder, self._byte_decoder,
                               (self.tokenizer.sot_token_id, self.tokenizer.eot_token_id))

    def tokenize(self, captions: Sequence[str]) -> TextBatch:
        if self._hf_tokenizer:
            return tokenize_hf(self, captions, self.pad_id)
        captions = list(captions)
        truncated = self._check_captions(captions, self.tokenizer.encode)
        ids = self.tokenizer(captions, context_length=self.context_length)
        eot_id = self.tokenizer.eot_token_id
        eot = (ids == eot_id).int().argmax(dim=1)
        pos = torch.arange(ids.shape[1])[None]
        word_mask = (pos > 0) & (pos < eot[:, None])
        tokens = [self._row_strings(row.tolist(), e) for row, e in zip(ids, eot.tolist())]
        return TextBatch(ids.to(self.device), eot.to(self.device), tokens, word_mask.to(self.device),
                         truncated, captions)

    # ---- text helpers ---------------------------------------------------------------------------
    def _text_pool_index(self, ids: torch.Tensor, length: int) -> torch.Tensor:
        """(B,) the position open_clip's text_global_pool reads, in a run of `length` positions."""
        pool = self.text.pool
        if pool == "argmax":        # CLIP's EOT: the highest token id
            return ids.argmax(dim=1)
        if pool == "eos":
            return (ids == self.text.eos_id).int().argmax(dim=1)
        return torch.full((ids.shape[0],), 0 if pool == "first" else length - 1, dtype=torch.long,
                          device=ids.device)

    def _text_len(self, text: TextBatch) -> int:
        """Sequence length actually run: a causal tower pooling a token stops after the batch's last
        pooled/EOT token (later positions cannot reach it); otherwise the full context."""
        if not self.text_causal or self.text.pool == "last":
            return text.ids.shape[1]
        return int(torch.maximum(text.eot, self._text_pool_index(text.ids, text.ids.shape[1])).max()) + 1

    def _text_mask(self, length: int):
        m = self.text.attn_mask
        return None if m is None else m[:length, :length]

    def _text_project(self, pooled: torch.Tensor) -> torch.Tensor:
        pooled = self.text.ln_final(pooled)
        proj = self.text.projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        return F.normalize(pooled, dim=-1)

    def _text_run(self, x: torch.Tensor, blocks, pooled: torch.Tensor) -> torch.Tensor:
        """Blocks over token states x (R, L, C), then the pooled row (R,) of the last one -> the
        normalised embedding; without recording, the last block evaluates only the pooled query."""
        mask = self._text_mask(x.shape[1])
        rec = self._record["text"]
        blocks = list(blocks)
        for blk in blocks[:-1]:
            x = run_block(blk, x, mask, record=rec)
        if blocks and rec is None:
            return self._text_project(run_block(blocks[-1], x, mask, query_index=pooled)[:, 0])
        if blocks:
            x = run_block(blocks[-1], x, mask, record=rec)
        return self._text_project(x[torch.arange(x.shape[0], device=x.device), pooled])

    # ---- split text encoder ------------------------------------------------------------------------
    def _text_prefix(self, text: TextBatch, layer: int) -> torch.Tensor:
        L = self._text_len(text)
        x = self.text.token_embedding(text.ids[:, :L]) + self.text.positional_embedding[:L]
        mask, rec = self._text_mask(L), self._record["text"]
        for blk in self.text.blocks[: layer + 1]:
            x = run_block(blk, x, mask, record=rec)
        return x

    def _text_suffix(self, hidden: torch.Tensor, text: TextBatch, layer: int) -> torch.Tensor:
        copies = hidden.shape[0] // len(text)
        pooled = self._text_pool_index(text.ids, hidden.shape[1]).repeat_interleave(copies)
        return self._text_run(hidden, self.text.blocks[layer + 1:], pooled)

    def _text_positions(self, text: TextBatch) -> torch.Tensor:
        L = self._text_len(text)
        if self.text_causal:
            return torch.arange(L, device=self.device)[None] <= text.eot[:, None]
        # bidirectional without a padding mask: every position reaches the pooled one
        return torch.ones(len(text), L, dtype=torch.bool, device=self.device)

    def _text_pooled_position(self, text: TextBatch) -> torch.Tensor:
        return self._text_pool_index(text.ids, self._text_len(text))

    def _text_embed_hidden(self, hidden: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """embed_hidden for text: the pooled position of any block's output -> final norm, projection."""
        pooled = self._text_pool_index(text.ids, hidden.shape[1])
        return self._text_project(hidden[torch.arange(hidden.shape[0], device=hidden.device), pooled])

    def embed_tokens(self, text: TextBatch) -> torch.Tensor:
        return self.text.token_embedding(text.ids)

    def encode_text_from_embeddings(self, embeddings: torch.Tensor, text: TextBatch) -> torch.Tensor:
        L = embeddings.shape[1]
        x = embeddings + self.text.positional_embedding[:L]
        return self._text_run(x, self.text.blocks, self._text_pool_index(text.ids, L))

    def _text_randomization(self) -> list:
        t = self.text
        proj = t.projection
        head = list(proj.parameters()) if isinstance(proj, torch.nn.Module) else ([proj] if proj is not None else [])
        groups = [("text.projection", head + list(t.ln_final.parameters()))]
        groups += [(f"text.block{i}", list(t.blocks[i].parameters())) for i in reversed(range(len(t.blocks)))]
        return groups + [("text.embeddings", [t.token_embedding.weight, t.positional_embedding])]


@register_family
class OpenClipViTAdapter(OpenClipTextTower, ModelAdapter):
    family = "open_clip_vit"

    @classmethod
    def serves(cls, model) -> bool:
        return type(getattr(model, "visual", None)).__name__ == "VisionTransformer" and has_open_clip_text(model)

    def __init__(self, model, preprocess, tokenizer, name: str, device="cpu"):
        self._wrap(model, preprocess, tokenizer, name, device)
        v = self.model.visual
        if not hasattr(v, "transformer") or not hasattr(v, "_embeds"):
            raise UnsupportedError(f"{name}: image tower {type(v).__name__} is not an open_clip VisionTransformer")
        self.visual = v
        self._init_text_tower()
        self.image_size = tuple(v.image_size)
        self.grid_size = tuple(v.grid_size)
        cfg = getattr(v, "preprocess_cfg", {}) or {}
        self.resize_mode = cfg.get("resize_mode", "shortest")
        self.num_layers = {"image": len(v.transformer.resblocks), "text": len(self.text.blocks)}
        # Only the class token reaches the embedding after the last block (not so with an attention
        # pool or mean pooling): the last block then evaluates just that query.
        self._trim_image = v.attn_pool is None and getattr(v, "pool_type", "tok") == "tok"

    # ---- split encoders ---------------------------------------------------------------------------
    def last_valid_layer(self, modality: str) -> int:
        return self.num_layers["image"] - 1 if modality == "image" and not self._trim_image \
            else super().last_valid_layer(modality)

    def pooled_position(self, modality: str, inputs):
        if modality == "text":
            return self._text_pooled_position(inputs)
        return super().pooled_position("image", inputs) if self._trim_image else None

    def prefix(self, modality: str, inputs, layer: int) -> torch.Tensor:
        layer = self.check_layer(modality, layer)
        if modality == "text":
            return self._text_prefix(inputs, layer)
        x = self.visual._embeds(inputs)
        rec = self._record["image"]
        for blk in self.visual.transformer.resblocks[: layer + 1]:
            x = run_block(blk, x, None, record=rec)
        return x

    def suffix(self, modality: str, hidden: torch.Tensor, inputs, layer: int) -> torch.Tensor:
        layer = self.check_layer(modality, layer)
        if modality == "text":
            return self._text_suffix(hidden, inputs, layer)
        rec = self._record["image"]
        x = hidden
        blocks = list(self.visual.transformer.resblocks[layer + 1:])
        for i, blk in enumerate(blocks):
            trim = self._trim_image and rec is None and i == len(blocks) - 1
            query = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if trim else None
            x = run_block(blk, x, None, query_index=query, record=rec)
        return self._image_head(x)

    def run_blocks(self, modality: str, hidden: torch.Tensor, inputs, start: int, stop: int) -> torch.Tensor:
        start, stop = self.check_block_span(modality, start, stop)
        mask = None if modality == "image" else self._text_mask(hidden.shape[1])
        x = hidden
        for blk in self._blocks(modality)[start + 1: stop + 1]:
            x = run_block(blk, x, mask, record=self._record[modality])
        return x

    def _image_head(self, x: torch.Tensor) -> torch.Tensor:
        """Image hidden state -> open_clip's pooling and final norm -> projection -> normalised."""
        pooled, _ = self.visual._pool(x)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return F.normalize(pooled, dim=-1)

    # ---- hooks -----------------------------------------------------------------------------------------
    supports_attention_parts = True

    def embed_hidden(self, modality: str, hidden: torch.Tensor, inputs) -> torch.Tensor:
        return self._image_head(hidden) if modality == "image" else self._text_embed_hidden(hidden, inputs)

    def _blocks(self, modality: str):
        return self.visual.transformer.resblocks if modality == "image" else self.text.blocks

    def randomization_order(self, modality: str):
        if modality == "text":
            return self._text_randomization()
        v = self.visual
        head = [p for p in [v.proj] if p is not None] + list(v.ln_post.parameters())
        groups = [("image.projection", head)]
        blocks = v.transformer.resblocks
        groups += [(f"image.block{i}", list(blocks[i].parameters())) for i in reversed(range(len(blocks)))]
        stem = [v.class_embedding, v.positional_embedding, *v.conv1.parameters(), *v.ln_pre.parameters()]
        return groups + [("image.embeddings", stem)]
