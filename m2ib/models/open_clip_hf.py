"""Adapter for open_clip CustomTextCLIP models with hf-hub style towers: a timm ViT image tower
(open_clip TimmModel) and a Hugging Face BERT text tower (open_clip HFTextEncoder).

This is the family of BiomedCLIP ('hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224',
Zhang et al. 2023): timm vit_base_patch16_224 + PubMedBERT, CLS pooling, MLP text projection.

Facts this adapter relies on (read from open_clip 3.x / timm 1.x / transformers 5.x):
- TimmModel = trunk (timm VisionTransformer) + head (dropout + linear, or MLP). The trunk runs
  patch_embed -> _pos_embed -> patch_drop -> norm_pre -> blocks -> norm -> forward_head (pool).
  timm's Eva (EVA02) differs only in _pos_embed returning (tokens, rotary embedding), patch drop
  included, and in passing that rotary embedding to every block. The image half (TimmImageTower)
  and the HFTokenizer handling (tokenize_hf) are shared with open_clip_timm (SigLIP, EVA02).
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
from m2ib.models.base import ModelAdapter, add_attention_parts, register_family

_SUPPORTED_POOLERS = ("ClsLastHiddenStatePooler", "ClsPooler", "MeanPooler")


# ---- timm ViT / EVA block, written out -----------------------------------------------------------
def _is_plain_timm_block(block) -> bool:
    try:
        from timm.layers import Attention
        from timm.models.eva import EvaAttention, EvaBlock
        from timm.models.vision_transformer import Block
    except ImportError:  # pragma: no cover
        return False
    return (type(block) is Block and type(block.attn) is Attention) or \
        (type(block) is EvaBlock and type(block.attn) is EvaAttention)


def _timm_qkv(attn, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v), each (B, heads, N, head_dim), as timm's Attention (one qkv linear) or EvaAttention
    (fused qkv weight with q/k/v biases, or three separate projections) computes them."""
    B, N, _ = h.shape
    if getattr(attn, "qkv", None) is None:                    # EvaAttention, qkv_fused=False
        return tuple(p(h).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
                     for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    if getattr(attn, "q_bias", None) is not None:             # EvaAttention, fused, bias split q/k/v
        qkv = F.linear(h, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
    else:
        qkv = attn.qkv(h)
    return qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _layer_scale(block, i: int, t: torch.Tensor) -> torch.Tensor:
    """timm Block's ls1/ls2 modules, or Eva's gamma_1/gamma_2 parameters (None: no layer scale)."""
    ls = getattr(block, f"ls{i}", None)
    if ls is not None:
        return ls(t)
    gamma = getattr(block, f"gamma_{i}", None)
    return t if gamma is None else gamma * t


def run_timm_block(block, x: torch.Tensor, query_index: Optional[int] = None,
                   record: Optional[list] = None, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (B, N, C) -> (B, N, C), or (B, 1, C) when only query `query_index` is needed.

    Without record/query_index this is the module call (so forward hooks see it). Written out, it
    follows timm's Attention / EvaAttention (q, k, v; optional q/k norm; EVA's rotary embedding `rope`
    on the non-prefix positions of q and k; softmax(q k^T * scale) v; optional output norm and gate;
    proj) and the pre-norm residual Block / EvaBlock (eval mode: drop-path is identity).
    """
    call = (lambda: block(x)) if rope is None else (lambda: block(x, rope=rope))
    if record is None and query_index is None:
        return call()
    if not _is_plain_timm_block(block):
        if record is not None:
            raise UnsupportedError(f"attention recording needs timm's plain vision_transformer.Block with "
                                   f"timm.layers.Attention or eva.EvaBlock with EvaAttention, got "
                                   f"{type(block).__name__}/{type(block.attn).__name__}")
        return call()[:, query_index:query_index + 1]
    attn = block.attn
    B = x.shape[0]
    h = block.norm1(x)
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = _timm_qkv(attn, h)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        from timm.layers import apply_rot_embed_cat
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q, k = (torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2).type_as(v)
                for t in (q, k))
    x_q = x
    if query_index is not None:
        q = q[:, :, query_index:query_index + 1]
        x_q = x[:, query_index:query_index + 1]
        gate = gate[:, query_index:query_index + 1] if gate is not None else None
    if record is None:
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    else:
        probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        record.append(probs)
        out = probs @ v
    heads_out = out
    out = attn.norm(out.transpose(1, 2).reshape(B, q.shape[2], q.shape[1] * q.shape[3]))
    if gate is not None:
        out = out * gate
    y = x_q + _layer_scale(block, 1, attn.proj(out))
    y = y + _layer_scale(block, 2, block.mlp(block.norm2(y)))
    add_attention_parts(record, q=q, k=k, v=v, out=heads_out, hidden=y)
    return y


def is_timm_vit(visual) -> bool:
    """Whether an open_clip image tower is a TimmModel around a timm ViT / Eva (patch embedding + blocks)."""
    trunk = getattr(visual, "trunk", None)
    return type(visual).__name__ == "TimmModel" and hasattr(trunk, "patch_embed") and hasattr(trunk, "blocks")


class TimmImageTower:
    """The image half of an adapter whose image tower is open_clip's TimmModel around a timm
    VisionTransformer (BiomedCLIP, SigLIP) or Eva (EVA02: rotary position embedding in every block).

    Pooling: the class token ('token'), an attention-pool head ('map', SigLIP: a learnt latent query
    attends to every patch token) or a mean over patch tokens ('avg'). Only 'token' leaves one
    position reaching the embedding after the last block; with the others every position does, so
    the last block is a valid bottleneck layer too (last_valid_layer).
    """

    def _init_image_tower(self) -> None:
        v = self.model.visual
        trunk = getattr(v, "trunk", None)
        if trunk is None or not all(hasattr(trunk, a) for a in ("patch_embed", "_pos_embed", "blocks", "forward_head")):
            raise UnsupportedError(f"{self.name}: image tower {type(trunk or v).__name__} is not a timm ViT/EVA")
        if not isinstance(getattr(v, "head", None), torch.nn.Sequential) or any(
                n not in ("drop", "proj", "mlp") for n, _ in v.head.named_children()):
            raise UnsupportedError(f"{self.name}: timm attention-pool heads (timm_pool abs_attn/rot_attn) need 2-D "
                                   f"feature maps and are not supported on a ViT trunk")
        if getattr(trunk, "rope_mixed", False):
            raise UnsupportedError(f"{self.name}: timm trunks with depth-dependent (mixed) RoPE are not supported")
        self.visual, self.trunk = v, trunk
        self.image_size = tuple(int(s) for s in v.image_size)
        trunk_size = tuple(int(s) for s in trunk.patch_embed.img_size)
        if trunk_size != self.image_size:
            raise InputError(f"{self.name}: the open_clip config says image_size {self.image_size} but the timm "
                             f"trunk expects {trunk_size}; fix vision_cfg.image_size")
        self.grid_size = tuple(int(s) for s in trunk.patch_embed.grid_size)
        self.num_prefix = int(getattr(trunk, "num_prefix_tokens", 1))
        cfg = getattr(v, "preprocess_cfg", {}) or {}
        self.resize_mode = cfg.get("resize_mode", "shortest")
        # Only the class token reaches the embedding after the last block: evaluate just that query.
        self._image_query = 0 if getattr(trunk, "attn_pool", None) is None and trunk.global_pool == "token" else None
        with torch.no_grad():    # EVA's rotary embedding: a constant of the patch grid
            _, self._rope = self._image_embeds(torch.zeros(1, 3, *self.image_size, device=self.device))

    def _image_embeds(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(tokens before block 0, EVA's rotary embedding or None), as the trunk's forward_features."""
        t = self.trunk
        out = t._pos_embed(t.patch_embed(pixels))
        x, rope = out if isinstance(out, tuple) else (t.patch_drop(out), None)   # Eva drops patches inside
        return t.norm_pre(x), rope

    def _image_prefix(self, pixels: torch.Tensor, layer: int) -> torch.Tensor:
        x, _ = self._image_embeds(pixels)
        rec = self._record["image"]
        for blk in self.trunk.blocks[: layer + 1]:
            x = run_timm_block(blk, x, record=rec, rope=self._rope)
        return x

    def _image_suffix(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        rec = self._record["image"]
        x = hidden
        blocks = list(self.trunk.blocks[layer + 1:])
        for i, blk in enumerate(blocks):
            query = self._image_query if rec is None and i == len(blocks) - 1 else None
            x = run_timm_block(blk, x, query_index=query, record=rec, rope=self._rope)
        return self._image_head(x)

    def _image_head(self, x: torch.Tensor) -> torch.Tensor:
        """Image hidden state -> final norm -> timm pooling -> open_clip head -> normalised."""
        return F.normalize(self.visual.head(self.trunk.forward_head(self.trunk.norm(x))), dim=-1)

    def _image_last_valid_layer(self) -> int:
        return len(self.trunk.blocks) - (2 if self._image_query is not None else 1)

    def _image_pooled_position(self, pixels: torch.Tensor) -> Optional[torch.Tensor]:
        if self._image_query is None:
            return None
        return torch.full((pixels.shape[0],), self._image_query, dtype=torch.long, device=pixels.device)

    def _image_randomization(self) -> list:
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


# ---- open_clip HFTokenizer --------------------------------------------------------------------------
def is_hf_tokenizer(name: str, tokenizer) -> bool:
    """Whether `tokenizer` is open_clip's HFTokenizer (a Hugging Face tokenizer behind open_clip's
    cleaning and padding); refuses its 'clips' mode, whose class token tokenize_hf does not place."""
    if not (hasattr(tokenizer, "tokenizer") and hasattr(tokenizer, "clean_fn")):
        return False
    if getattr(tokenizer, "tokenizer_mode", "") == "clips":
        raise UnsupportedError(f"{name}: HFTokenizer mode 'clips' (class token appended) is not supported")
    return True


def hf_blank_id(hf_tok, pad_id: int) -> int:
    """The token that stands for a removed word: [MASK] where the tokenizer has one (what BERT was
    pre-trained to read as "a word is missing here"), else the unknown token, else padding."""
    for tid in (hf_tok.mask_token_id, hf_tok.unk_token_id):
        if tid is not None:
            return int(tid)
    return int(pad_id)


def tokenize_hf(adapter, captions: Sequence[str], pad_id: int) -> TextBatch:
    """Captions -> TextBatch through open_clip's HFTokenizer, for BERT's layout ([CLS] words [SEP]
    [PAD]...) and SigLIP's (words </s> padding...). eot is the first end token ([SEP], else </s>; the
    last non-padding token if the tokenizer has neither); word tokens are the positions before it
    that are not a start ([CLS]/<s>) or padding token."""
    captions = list(captions)
    tok = adapter.tokenizer
    hf_tok = tok.tokenizer
    truncated = adapter._check_captions(captions, lambda c: hf_tok(tok.clean_fn(c), add_special_tokens=False).input_ids,
                                        hf_tok.num_special_tokens_to_add())
    ids = tok(captions, context_length=adapter.context_length)
    end_id = hf_tok.sep_token_id if hf_tok.sep_token_id is not None else hf_tok.eos_token_id
    last_real = (ids != pad_id).long().cumsum(1).argmax(1)          # index of the last non-padding token
    is_end = ids == end_id if end_id is not None else torch.zeros_like(ids, dtype=torch.bool)
    eot = torch.where(is_end.any(1), is_end.int().argmax(1), last_real)
    starts = torch.tensor([t for t in (hf_tok.cls_token_id, hf_tok.bos_token_id, pad_id) if t is not None])
    pos = torch.arange(ids.shape[1])[None]
    word_mask = (pos < eot[:, None]) & ~torch.isin(ids, starts)
    tokens = [[t if j <= e else "" for j, t in enumerate(hf_tok.convert_ids_to_tokens(row.tolist()))]
              for row, e in zip(ids, eot.tolist())]
    return TextBatch(ids.to(adapter.device), eot.to(adapter.device), tokens, word_mask.to(adapter.device),
                     truncated, captions)


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


@register_family
class OpenClipHFAdapter(TimmImageTower, ModelAdapter):
    """open_clip CustomTextCLIP with a timm ViT image tower and an HF BERT text tower."""

    family = "open_clip_hf"

    @classmethod
    def serves(cls, model) -> bool:
        return is_timm_vit(getattr(model, "visual", None)) and type(getattr(model, "text", None)).__name__ == "HFTextEncoder"

    def __init__(self, model, preprocess, tokenizer, name: str, device="cpu"):
        self._wrap(model, preprocess, tokenizer, name, device)
        if not is_hf_tokenizer(name, tokenizer):
            raise UnsupportedError(f"{name}: tokenizer {type(tokenizer).__name__} is not open_clip's HFTokenizer")
        self._init_image_tower()
        self._check_text_tower()
        self.text = self.model.text
        self.bert = self.text.transformer
        self.num_layers = {"image": len(self.trunk.blocks), "text": len(self.bert.encoder.layer)}
        self.context_length = int(tokenizer.context_length)
        if self.context_length > self.bert.config.max_position_embeddings:
            raise InputError(f"{name}: tokenizer context length {self.context_length} exceeds the text tower's "
                             f"{self.bert.config.max_position_embeddings} positions")
        self.pad_id = int(self.bert.config.pad_token_id if self.bert.config.pad_token_id is not None else 0)
        self.blank_token_id = hf_blank_id(tokenizer.tokenizer, self.pad_id)
        pooler = type(self.text.pooler).__name__
        self._pool_kind = {"ClsLastHiddenStatePooler": "cls", "ClsPooler": "cls", "MeanPooler": "mean"}[pooler]
        self._bert_pooler = (self.bert.pooler if pooler == "ClsPooler" and self.text.pooler.use_pooler_output
                             and getattr(self.bert, "pooler", None) is not None else None)
        # Only the [CLS] token reaches the embedding after the last layer: evaluate just that query.
        self._text_query = 0 if self._pool_kind == "cls" else None

    def _check_text_tower(self) -> None:
        """Refuse, with the reason, any text tower this adapter's written-out forward would get wrong."""
        t = getattr(self.model, "text", None)
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
        return tokenize_hf(self, captions, self.pad_id)

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
    def last_valid_layer(self, modality: str) -> int:
        if modality == "image":
            return self._image_last_valid_layer()
        return self.num_layers["text"] - (2 if self._text_query is not None else 1)

    def pooled_position(self, modality: str, inputs):
        if modality == "image":
            return self._image_pooled_position(inputs)
        return None if self._text_query is None else torch.zeros_like(inputs.eot)

    def prefix(self, modality: str, inputs, layer: int) -> torch.Tensor:
        layer = self.check_layer(modality, layer)
        if modality == "image":
            return self._image_prefix(inputs, layer)
        rec = self._record[modality]
        ids = inputs.ids[:, : self._text_len(inputs)]
        x = self.bert.embeddings(input_ids=ids)
        mask = self._key_mask(ids, x.dtype)
        for lyr in self.bert.encoder.layer[: layer + 1]:
            x = run_bert_layer(lyr, x, mask, record=rec)
        return x

    def suffix(self, modality: str, hidden: torch.Tensor, inputs, layer: int) -> torch.Tensor:
        layer = self.check_layer(modality, layer)
        if modality == "image":
            return self._image_suffix(hidden, layer)
        rec = self._record[modality]
        x = hidden
        copies = hidden.shape[0] // len(inputs)
        ids = inputs.ids[:, : hidden.shape[1]].repeat_interleave(copies, dim=0)
        mask = self._key_mask(ids, x.dtype)
        layers = list(self.bert.encoder.layer[layer + 1:])
        for i, lyr in enumerate(layers):
            query = self._text_query if rec is None and i == len(layers) - 1 else None
            x = run_bert_layer(lyr, x, mask, query_index=query, record=rec)
        return self._text_head(x, ids)

    def run_blocks(self, modality: str, hidden: torch.Tensor, inputs, start: int, stop: int) -> torch.Tensor:
        start, stop = self.check_block_span(modality, start, stop)
        rec = self._record[modality]
        x = hidden
        if modality == "image":
            for blk in self.trunk.blocks[start + 1: stop + 1]:
                x = run_timm_block(blk, x, record=rec, rope=self._rope)     # EVA: rotary embedding per block
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

    # ---- hooks -----------------------------------------------------------------------------------------
    supports_attention_parts = True

    def embed_hidden(self, modality: str, hidden: torch.Tensor, inputs) -> torch.Tensor:
        if modality == "image":
            return self._image_head(hidden)
        return self._text_head(hidden, inputs.ids)

    def _blocks(self, modality: str):
        return self.trunk.blocks if modality == "image" else self.bert.encoder.layer

    def randomization_order(self, modality: str):
        if modality == "image":
            return self._image_randomization()
        head = list(self.text.proj.parameters())
        if self._bert_pooler is not None:
            head += list(self._bert_pooler.parameters())
        layers = self.bert.encoder.layer
        groups = [("text.projection", head)]
        groups += [(f"text.block{i}", list(layers[i].parameters())) for i in reversed(range(len(layers)))]
        return groups + [("text.embeddings", list(self.bert.embeddings.parameters()))]
