"""Adapter for open_clip models with a ViT image tower and an open_clip text transformer.

Covers open_clip's CLIP (text modules inline) and CustomTextCLIP with a TextTransformer, for any
ViT config: ViT-B-32, ViT-B-16, ViT-L-14 and the small configs this project registers.
"""
from __future__ import annotations

import codecs
from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn.functional as F

from m2ib.core.errors import UnsupportedError
from m2ib.core.records import TextBatch
from m2ib.models.base import ModelAdapter
from m2ib.models.blocks import run_block


def _text_tower(model) -> SimpleNamespace:
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
        raise UnsupportedError("this open_clip model's text tower is not an open_clip TextTransformer "
                               "(hf-hub text towers need the open_clip_hf adapter)")
    if getattr(t, "use_pad_mask", False):
        raise UnsupportedError("bidirectional text towers with a padding mask are not supported")
    if cls_emb is not None or pool not in ("argmax", "eos"):
        raise UnsupportedError(f"text pooling {pool!r} / class-token text towers are not supported")
    return SimpleNamespace(token_embedding=t.token_embedding, positional_embedding=t.positional_embedding,
                           blocks=t.transformer.resblocks, ln_final=t.ln_final,
                           projection=t.text_projection, attn_mask=t.attn_mask)


class OpenClipViTAdapter(ModelAdapter):
    family = "open_clip_vit"

    def __init__(self, model, preprocess, tokenizer, name: str, device="cpu"):
        self._wrap(model, preprocess, tokenizer, name, device)
        v = self.model.visual
        if not hasattr(v, "transformer") or not hasattr(v, "_embeds"):
            raise UnsupportedError(f"{name}: image tower {type(v).__name__} is not an open_clip VisionTransformer")
        self.visual = v
        self.text = _text_tower(self.model)
        self.image_size = tuple(v.image_size)
        self.grid_size = tuple(v.grid_size)
        cfg = getattr(v, "preprocess_cfg", {}) or {}
        self.resize_mode = cfg.get("resize_mode", "shortest")
        self.num_layers = {"image": len(v.transformer.resblocks), "text": len(self.text.blocks)}
        self.context_length = int(self.text.positional_embedding.shape[0])
        self.text_causal = self.text.attn_mask is not None
        self._trim_image = v.attn_pool is None and getattr(v, "pool_type", "tok") == "tok"
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
        """Display strings of one id row: the word pieces of a word are UTF-8-decoded jointly.

        Each byte-level BPE token gets exactly the characters its bytes complete, so a token holding
        only the leading bytes of a multi-byte character gets '' and the token completing it gets the
        character; the decoder is flushed at the word end ('</w>'). A word's token strings therefore
        concatenate to the word's text, and ASCII tokens read as before. Start/end-of-text tokens keep
        their special strings; positions after the end-of-text token are ''.
        """
        if self._decoder is None or not self._byte_decoder:
            return [self._token_string(t) if j <= eot else "" for j, t in enumerate(row)]
        special = (self.tokenizer.sot_token_id, self.tokenizer.eot_token_id)
        out: list[str] = []
        dec = None      # incremental decoder of the word in progress
        for j, tid in enumerate(row):
            if j > eot:
                out.append("")
                continue
            tok = self._decoder.get(int(tid), "")
            if tid in special:
                # a word cut by truncation: its incomplete trailing bytes are dropped
                dec = None
                out.append(tok)
                continue
            end = tok.endswith("</w>")
            tok = tok.replace("</w>", "")
            if dec is None:
                dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
            data = bytes(self._byte_decoder.get(c, ord("?")) for c in tok)
            out.append(dec.decode(data, final=end))
            if end:
                dec = None
        return out

    def tokenize(self, captions: Sequence[str]) -> TextBatch:
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
    def _text_len(self, text: TextBatch) -> int:
        """Sequence length actually run: causal towers stop after the last EOT of the batch."""
        return int(text.eot.max()) + 1 if self.text_causal else text.ids.shape[1]

    def _text_mask(self, length: int):
        m = self.text.attn_mask
        return None if m is None else m[:length, :length]

    def _text_project(self, pooled: torch.Tensor) -> torch.Tensor:
        pooled = self.text.ln_final(pooled)
        proj = self.text.projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        return F.normalize(pooled, dim=-1)

    # ---- split encoders ---------------------------------------------------------------------------
    def prefix(self, modality: str, inputs, layer: int) -> torch.Tensor:
        layer = self.check_layer(modality, layer)
        if modality == "image":
            x = self.visual._embeds(inputs)
            blocks, mask = self.visual.transformer.resblocks, None
        else:
            L = self._text_len(inputs)
            x = self.text.token_embedding(inputs.ids[:, :L]) + self.text.positional_embedding[:L]
            blocks, mask = self.text.blocks, self._text_mask(L)
        rec = self._record[modality]
        for blk in blocks[: layer + 1]:
            x = run_block(blk, x, mask, record=rec)
        return x

    def suffix(self, modality: str, hidden: torch.Tensor, inputs, layer: int) -> torch.Tensor:
        layer = self.check_layer(modality, layer) if layer is not None else -1
        rec = self._record[modality]
        x = hidden
        if modality == "image":
            blocks = self.visual.transformer.resblocks
            *middle, last = list(blocks[layer + 1:])
            for blk in middle:
                x = run_block(blk, x, None, record=rec)
            if self._trim_image and rec is None:
                x = run_block(last, x, None, query_index=torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
            else:
                x = run_block(last, x, None, record=rec)
            return self._image_head(x)
        copies = hidden.shape[0] // len(inputs)
        eot = inputs.eot.repeat_interleave(copies)
        mask = self._text_mask(hidden.shape[1])
        *middle, last = list(self.text.blocks[layer + 1:])
        for blk in middle:
            x = run_block(blk, x, mask, record=rec)
        if rec is None:
            pooled = run_block(last, x, mask, query_index=eot)[:, 0]
        else:
            x = run_block(last, x, mask, record=rec)
            pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        return self._text_project(pooled)

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

    def _text_positions(self, text: TextBatch) -> torch.Tensor:
        return torch.arange(self._text_len(text), device=self.device)[None] <= text.eot[:, None]

    def embed_tokens(self, text: TextBatch) -> torch.Tensor:
        return self.text.token_embedding(text.ids)

    def encode_text_from_embeddings(self, embeddings: torch.Tensor, text: TextBatch) -> torch.Tensor:
        L = embeddings.shape[1]
        x = embeddings + self.text.positional_embedding[:L]
        mask = self._text_mask(L)
        rec = self._record["text"]
        for blk in self.text.blocks:
            x = run_block(blk, x, mask, record=rec)
        return self._text_project(x[torch.arange(x.shape[0], device=x.device), text.eot])

    # ---- hooks -----------------------------------------------------------------------------------------
    supports_attention_parts = True

    def pooled_index(self, modality: str, inputs) -> torch.Tensor:
        if modality == "text":
            return inputs.eot
        if not self._trim_image:
            raise UnsupportedError(f"model {self.name}: its image tower pools tokens (attention pooling or "
                                   f"pool_type {getattr(self.visual, 'pool_type', '?')!r}); there is no single "
                                   f"pooled token")
        return torch.zeros(inputs.shape[0], dtype=torch.long, device=self.device)

    def embed_hidden(self, modality: str, hidden: torch.Tensor, inputs) -> torch.Tensor:
        if modality == "image":
            return self._image_head(hidden)
        return self._text_project(hidden[torch.arange(hidden.shape[0], device=hidden.device), inputs.eot])

    def _blocks(self, modality: str):
        return self.visual.transformer.resblocks if modality == "image" else self.text.blocks

    def randomization_order(self, modality: str):
        if modality == "image":
            v = self.visual
            head = [p for p in [v.proj] if p is not None] + list(v.ln_post.parameters())
            groups = [("image.projection", head)]
            blocks = v.transformer.resblocks
            groups += [(f"image.block{i}", list(blocks[i].parameters())) for i in reversed(range(len(blocks)))]
            stem = [v.class_embedding, v.positional_embedding, *v.conv1.parameters(), *v.ln_pre.parameters()]
            return groups + [("image.embeddings", stem)]
        t = self.text
        proj = t.projection
        head = list(proj.parameters()) if isinstance(proj, torch.nn.Module) else ([proj] if proj is not None else [])
        groups = [("text.projection", head + list(t.ln_final.parameters()))]
        groups += [(f"text.block{i}", list(t.blocks[i].parameters())) for i in reversed(range(len(t.blocks)))]
        return groups + [("text.embeddings", [t.token_embedding.weight, t.positional_embedding])]
