"""Adapter for open_clip CustomTextCLIP models with hf-hub style towers: a timm ViT image tower
(open_clip TimmModel) and a Hugging Face BERT text tower (open_clip HFTextEncoder).

This is the family of BiomedCLIP ('hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224',
Zhang et al. 2023): timm vit_base_patch16_224 + PubMedBERT, CLS pooling, MLP text projection.

Facts this adapter relies on (read from open_clip 3.x / timm 1.x / transformers 5.x):
- TimmModel = trunk (timm VisionTransformer) + head (dropout + linear, or MLP). The trunk runs
  patch_embed -> _pos_embed -> patch_drop -> norm_pre -> blocks -> norm -> forward_head (pool).
- HFTextEncoder derives its attention mask from `ids != config.pad_token_id`, runs BERT, pools
  (CLS of the last hidden state, BERT's tanh pooler, or a masked mean) and projects.
- BERT is bidirectional: every real token attends to every other, so the text is never cut at
  the end-of-text token as the causal CLIP text tower allows. Trailing padding, however, is masked
  out as a key for every query, so dropping the columns after the batch's longest caption is exact
  (tested against the model's own encode_text on the fully padded input); this keeps BiomedCLIP's
  256-token context from costing 10x the compute of a 25-token caption.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from m2ib.core.errors import InputError, UnsupportedError
from m2ib.core.records import TextBatch
from m2ib.models.base import ModelAdapter, add_attention_parts

_SUPPORTED_POOLERS = ("ClsLastHiddenStatePooler", "ClsPooler", "MeanPooler")


# ---- timm ViT block, written out ---------------------------------------------------------------
def _is_plain_timm_block(block) -> bool:
    try:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block
    except ImportError:  # pragma: no cover
        return False
    return type(block) is Block and type(block.attn) is Attention


def run_timm_block(block, x: torch.Tensor, query_index: Optional[int] = None,
                   record: Optional[list] = None) -> torch.Tensor:
    """x (B, N, C) -> (B, N, C), or (B, 1, C) when only query `query_index` is needed.

    Without record/query_index this is the module call (so forward hooks see it). Written out, it
    follows timm's Attention (qkv, optional q/k norm, softmax(q k^T * scale) v, optional output
    norm and gate, proj) and the pre-norm residual Block (eval mode: drop-path is identity).
    """
    if record is None and query_index is None:
        return block(x)
    if not _is_plain_timm_block(block):
        if record is not None:
            raise UnsupportedError(f"attention recording needs timm's plain vision_transformer.Block with "
                                   f"timm.layers.Attention, got {type(block).__name__}/{type(block.attn).__name__}")
        return block(x)[:, query_index:query_index + 1]
    attn = block.attn
    B, N, _ = x.shape
    h = block.norm1(x)
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    x_q = x
    if query_index is not None:
        q = q[:, :, query_index:query_index + 1]
        x_q = x[:, query_index:query_index + 1]
        gate = gate[:, query_index:query_index + 1] if gate is not None else None
    if record is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        record.append(probs)
        out = probs @ v
    heads_out = out
    out = attn.norm(out.transpose(1, 2).reshape(B, q.shape[2], attn.attn_dim))
    if gate is not None:
        out = out * gate
    y = x_q + block.ls1(attn.proj(out))
    y = y + block.ls2(block.mlp(block.norm2(y)))
    add_attention_parts(record, q=q, k=k, v=v, out=heads_out, hidden=y)
    return y


# ---- BERT layer, written out --------------------------------------------------------------------
def run_bert_layer(layer, x: torch.Tensor, add_mask: torch.Tensor, query_index: Optional[int] = None,
                   record: Optional[list] = None) -> torch.Tensor:
    """One HF BertLayer. add_mask: (B, 1, 1, N) additive float mask (0 real, dtype-min padding).

    Without record/query_index this is the module call. Written out it is BERT's post-norm layer:
    a = LN(x + dense(softmax(q k^T / sqrt(d) + mask) v)); out = LN(a + dense(act(dense(a)))).
    """
    if record is None and query_index is None:
        out = layer(x, add_mask)
        return out[0] if isinstance(out, tuple) else out
    sa = layer.attention.self
    B, N, _ = x.shape
    heads, hd = sa.num_attention_heads, sa.attention_head_size
    x_q = x if query_index is None else x[:, query_index:query_index + 1]
    q = sa.query(x_q).view(B, -1, heads, hd).transpose(1, 2)
    k = sa.key(x).view(B, N, heads, hd).transpose(1, 2)
    v = sa.value(x).view(B, N, heads, hd).transpose(1, 2)
    scale = getattr(sa, "scaling", hd ** -0.5)
    if record is None:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=add_mask.to(q.dtype), scale=scale)
    else:
        probs = ((q @ k.transpose(-2, -1)) * scale + add_mask.to(q.dtype)).softmax(dim=-1)
        record.append(probs)
        ctx = probs @ v
    heads_out = ctx
    ctx = ctx.transpose(1, 2).reshape(B, x_q.shape[1], heads * hd)
    a = layer.attention.output(ctx, x_q)
    y = layer.output(layer.intermediate(a), a)
    add_attention_parts(record, q=q, k=k, v=v, out=heads_out, hidden=y)
    return y


class OpenClipHFAdapter(ModelAdapter):
    """open_clip CustomTextCLIP with a timm ViT image tower and an HF BERT text tower."""

    family = "open_clip_hf"

    def __init__(self, model, preprocess, tokenizer, name: str, device="cpu"):
        self._wrap(model, preprocess, tokenizer, name, device)
        if not hasattr(tokenizer, "tokenizer") or not hasattr(tokenizer, "clean_fn"):
            raise UnsupportedError(f"{name}: tokenizer {type(tokenizer).__name__} is not open_clip's HFTokenizer")
        if getattr(tokenizer, "tokenizer_mode", "") == "clips":
            raise UnsupportedError(f"{name}: HFTokenizer mode 'clips' (no [CLS]/[SEP] layout) is not supported")
        self._check_towers()
        v = self.model.visual
        self.visual, self.trunk = v, v.trunk
        self.text = self.model.text
        self.bert = self.text.transformer
        self.image_size = tuple(int(s) for s in v.image_size)
        trunk_size = tuple(int(s) for s in self.trunk.patch_embed.img_size)
        if trunk_size != self.image_size:
            raise InputError(f"{name}: the open_clip config says image_size {self.image_size} but the timm "
                             f"trunk expects {trunk_size}; fix vision_cfg.image_size")
        self.grid_size = tuple(int(s) for s in self.trunk.patch_embed.grid_size)
        self.num_prefix = int(getattr(self.trunk, "num_prefix_tokens", 1))
        cfg = getattr(v, "preprocess_cfg", {}) or {}
        self.resize_mode = cfg.get("resize_mode", "shortest")
        self.num_layers = {"image": len(self.trunk.blocks), "text": len(self.bert.encoder.layer)}
        self.context_length = int(tokenizer.context_length)
        if self.context_length > self.bert.config.max_position_embeddings:
            raise InputError(f"{name}: tokenizer context length {self.context_length} exceeds the text tower's "
                             f"{self.bert.config.max_position_embeddings} positions")
        self.pad_id = int(self.bert.config.pad_token_id if self.bert.config.pad_token_id is not None else 0)
        hf_tok = tokenizer.tokenizer
        self.sep_id = hf_tok.sep_token_id
        # [MASK] is what BERT was pre-trained to read as "a word is missing here".
        blank = hf_tok.mask_token_id if hf_tok.mask_token_id is not None else hf_tok.unk_token_id
        self.blank_token_id = int(blank if blank is not None else self.pad_id)
        pooler = type(self.text.pooler).__name__
        self._pool_kind = {"ClsLastHiddenStatePooler": "cls", "ClsPooler": "cls", "MeanPooler": "mean"}[pooler]
        self._bert_pooler = (self.bert.pooler if pooler == "ClsPooler" and self.text.pooler.use_pooler_output
                             and getattr(self.bert, "pooler", None) is not None else None)
        # Only the pooled token reaches the embedding after the last block: evaluate just that query.
        self._image_query = (0 if getattr(self.trunk, "attn_pool", None) is None
                             and self.trunk.global_pool == "token" else None)
        self._text_query = 0 if self._pool_kind == "cls" else None

    def _check_towers(self) -> None:
        """Refuse, with the reason, any tower this adapter's written-out forward would get wrong."""
        v, t = self.model.visual, getattr(self.model, "text", None)
        trunk = getattr(v, "trunk", None)
        if trunk is None or not all(hasattr(trunk, a) for a in ("patch_embed", "_pos_embed", "blocks", "forward_head")):
            raise UnsupportedError(f"{self.name}: image tower {type(trunk or v).__name__} is not a timm VisionTransformer")
        if not isinstance(getattr(v, "head", None), torch.nn.Sequential) or any(
                n not in ("drop", "proj", "mlp") for n, _ in v.head.named_children()):
            raise UnsupportedError(f"{self.name}: timm attention-pool heads (timm_pool abs_attn/rot_attn) need 2-D "
                                   f"feature maps and are not supported on a ViT trunk")
        bert = getattr(t, "transformer", None)
        if bert is None or not hasattr(t, "pooler"):
            raise UnsupportedError(f"{self.name}: text tower {type(t).__name__} is not an open_clip HFTextEncoder")
        cfg = bert.config
        if cfg.model_type != "bert":
            raise UnsupportedError(f"{self.name}: HF text tower of type {cfg.model_type!r}; only BERT "
                                   f"(e.g. PubMedBERT in BiomedCLIP) is supported")
        if getattr(cfg, "is_decoder", False) or getattr(cfg, "position_embedding_type", "absolute") != "absolute":
            raise UnsupportedError(f"{self.name}: BERT text towers must be bidirectional encoders with absolute "
                                   f"position embeddings")
        if getattr(self.model.text, "output_tokens", False):
            raise UnsupportedError(f"{self.name}: text towers with output_tokens=True are not supported")
        pooler = type(t.pooler).__name__
        if pooler not in _SUPPORTED_POOLERS:
            raise UnsupportedError(f"{self.name}: text pooler {pooler} is not supported (supported: {_SUPPORTED_POOLERS})")

    # ---- inputs -------------------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str]) -> TextBatch:
        captions = list(captions)
        hf_tok = self.tokenizer.tokenizer
        truncated = self._check_captions(
            captions, lambda c: hf_tok(self.tokenizer.clean_fn(c), add_special_tokens=False).input_ids)
        ids = self.tokenizer(captions, context_length=self.context_length)
        real = ids != self.pad_id
        last_real = real.long().cumsum(1).argmax(1)          # index of the last non-padding token
        is_sep = ids == self.sep_id if self.sep_id is not None else torch.zeros_like(real)
        eot = torch.where(is_sep.any(1), is_sep.int().argmax(1), last_real)
        pos = torch.arange(ids.shape[1])[None]
        word_mask = (pos > 0) & (pos < eot[:, None]) & real
        tokens = [[t if j <= e else "" for j, t in enumerate(hf_tok.convert_ids_to_tokens(row.tolist()))]
                  for row, e in zip(ids, eot.tolist())]
        return TextBatch(ids.to(self.device), eot.to(self.device), tokens, word_mask.to(self.device),
                         truncated, captions)

    # ---- text helpers ---------------------------------------------------------------------------
    def _text_len(self, text: TextBatch) -> int:
        """Columns up to the batch's last non-padding token (padding keys are masked anyway)."""
        real = text.ids != self.pad_id
        return int(real.long().cumsum(1).argmax(1).max()) + 1

    def _key_mask(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, 1, N) additive mask: 0 on real tokens, the dtype's minimum on padding (as HF does)."""
        real = (ids != self.pad_id)[:, None, None, :]
        return torch.zeros(real.shape, dtype=dtype, device=ids.device).masked_fill(~real, torch.finfo(dtype).min)

    def _text_head(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Last hidden state -> pooled -> projected -> normalised, as HFTextEncoder + CustomTextCLIP."""
        if self._pool_kind == "cls":
            pooled = x[:, 0]
            if self._bert_pooler is not None:
                pooled = self._bert_pooler(x[:, :1])
        else:
            m = (ids[:, :x.shape[1]] != self.pad_id).to(x.dtype).unsqueeze(-1)
            pooled = (x * m).sum(1) / m.sum(1)
        return F.normalize(self.text.proj(pooled), dim=-1)

    # ---- split encoders ---------------------------------------------------------------------------
    def _image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t._pos_embed(t.patch_embed(pixels))
        return t.norm_pre(t.patch_drop(x))

    def prefix(self, modality: str, inputs, layer: int) -> torch.Tensor:
        layer = self.check_layer(modality, layer)
        rec = self._record[modality]
        if modality == "image":
            x = self._image_embeds(inputs)
            for blk in self.trunk.blocks[: layer + 1]:
                x = run_timm_block(blk, x, record=rec)
            return x
        ids = inputs.ids[:, : self._text_len(inputs)]
        x = self.bert.embeddings(input_ids=ids)
        mask = self._key_mask(ids, x.dtype)
        for lyr in self.bert.encoder.layer[: layer + 1]:
            x = run_bert_layer(lyr, x, mask, record=rec)
        return x

    def suffix(self, modality: str, hidden: torch.Tensor, inputs, layer: int) -> torch.Tensor:
        layer = self.check_layer(modality, layer)
        rec = self._record[modality]
        x = hidden
        if modality == "image":
            *middle, last = list(self.trunk.blocks[layer + 1:])
            for blk in middle:
                x = run_timm_block(blk, x, record=rec)
            x = run_timm_block(last, x, query_index=self._image_query if rec is None else None, record=rec)
            return self._image_head(x)
        copies = hidden.shape[0] // len(inputs)
        ids = inputs.ids[:, : hidden.shape[1]].repeat_interleave(copies, dim=0)
        mask = self._key_mask(ids, x.dtype)
        *middle, last = list(self.bert.encoder.layer[layer + 1:])
        for lyr in middle:
            x = run_bert_layer(lyr, x, mask, record=rec)
        x = run_bert_layer(last, x, mask, query_index=self._text_query if rec is None else None, record=rec)
        return self._text_head(x, ids)

    def run_blocks(self, modality: str, hidden: torch.Tensor, inputs, start: int, stop: int) -> torch.Tensor:
        start, stop = self.check_block_span(modality, start, stop)
        rec = self._record[modality]
        x = hidden
        if modality == "image":
            for blk in self.trunk.blocks[start + 1: stop + 1]:
                x = run_timm_block(blk, x, record=rec)
            return x
        copies = hidden.shape[0] // len(inputs)
        ids = inputs.ids[:, : hidden.shape[1]].repeat_interleave(copies, dim=0)
        mask = self._key_mask(ids, x.dtype)
        for lyr in self.bert.encoder.layer[start + 1: stop + 1]:
            x = run_bert_layer(lyr, x, mask, record=rec)
        return x

    def _text_positions(self, text: TextBatch) -> torch.Tensor:
        return text.ids[:, : self._text_len(text)] != self.pad_id

    def embed_tokens(self, text: TextBatch) -> torch.Tensor:
        return self.bert.embeddings.word_embeddings(text.ids)

    def encode_text_from_embeddings(self, embeddings: torch.Tensor, text: TextBatch) -> torch.Tensor:
        ids = text.ids[:, : embeddings.shape[1]]
        x = self.bert.embeddings(inputs_embeds=embeddings)
        mask = self._key_mask(ids, x.dtype)
        rec = self._record["text"]
        for lyr in self.bert.encoder.layer:
            x = run_bert_layer(lyr, x, mask, record=rec)
        return self._text_head(x, ids)

    def _image_head(self, x: torch.Tensor) -> torch.Tensor:
        """Image hidden state -> final norm -> timm pooling -> open_clip head -> normalised."""
        return F.normalize(self.visual.head(self.trunk.forward_head(self.trunk.norm(x))), dim=-1)

    # ---- hooks -----------------------------------------------------------------------------------------
    supports_attention_parts = True

    def pooled_index(self, modality: str, inputs) -> torch.Tensor:
        query = self._image_query if modality == "image" else self._text_query
        if query is None:
            pool = self.trunk.global_pool if modality == "image" else self._pool_kind
            raise UnsupportedError(f"model {self.name}: its {modality} tower pools tokens ({pool!r}); there is "
                                   f"no single pooled token")
        return torch.full((len(inputs),), query, dtype=torch.long, device=self.device)

    def embed_hidden(self, modality: str, hidden: torch.Tensor, inputs) -> torch.Tensor:
        if modality == "image":
            return self._image_head(hidden)
        return self._text_head(hidden, inputs.ids)

    def _blocks(self, modality: str):
        return self.trunk.blocks if modality == "image" else self.bert.encoder.layer

    def randomization_order(self, modality: str):
        if modality == "image":
            t = self.trunk
            head = [*self.visual.head.parameters(), *t.norm.parameters(), *t.fc_norm.parameters(),
                    *t.head.parameters()]
            if getattr(t, "attn_pool", None) is not None:
                head += list(t.attn_pool.parameters())
            groups = [("image.projection", head)]
            groups += [(f"image.block{i}", list(t.blocks[i].parameters())) for i in reversed(range(len(t.blocks)))]
            stem = [p for p in (t.cls_token, getattr(t, "reg_token", None), t.pos_embed) if p is not None]
            stem += [*t.patch_embed.parameters(), *t.norm_pre.parameters()]
            return groups + [("image.embeddings", stem)]
        head = list(self.text.proj.parameters())
        if self._bert_pooler is not None:
            head += list(self._bert_pooler.parameters())
        layers = self.bert.encoder.layer
        groups = [("text.projection", head)]
        groups += [(f"text.block{i}", list(layers[i].parameters())) for i in reversed(range(len(layers)))]
        return groups + [("text.embeddings", list(self.bert.embeddings.parameters()))]
