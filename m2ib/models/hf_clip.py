"""Adapter for Hugging Face transformers CLIPModel (e.g. 'openai/clip-vit-base-patch32', the model the
released M2IB code explains), loaded from the Hub cache or from a `save_pretrained` folder.

model.name 'hf:<hub id or folder>' (sources.py resolves it; build_hf_clip builds it). The folder (or Hub
snapshot) must hold config.json (a CLIPConfig), the weights, the tokenizer (tokenizer.json or
vocab.json + merges.txt) and preprocessor_config.json: together what `CLIPModel.save_pretrained(d)` and
`CLIPProcessor.save_pretrained(d)` write.

Facts this adapter relies on (read from transformers 5.x modeling_clip.py):
- vision: embeddings (patch conv without bias, class embedding, position embedding) -> pre_layrnorm ->
  encoder layers -> post_layernorm of the class token -> visual_projection (no bias);
- text: token + position embeddings -> causal encoder layers -> final_layer_norm -> the hidden state at
  the end-of-text position -> text_projection. That position is the argmax of the ids when the config's
  eos_token_id is 2 (configs written before transformers PR #24773, e.g. openai/clip-vit-base-patch32),
  else the first eos_token_id; the adapter pools where the model pools and checks that it is the
  tokenizer's end-of-text token;
- a layer is pre-norm: x + attn(LN1 x), then + MLP(LN2 .); attention softmax(q k^T * head_dim^-0.5 + mask) v
  with separate q/k/v projections.
Text is tokenised as the released M2IB code does, without padding: the ids are stored padded to the
context, but only start-of-text .. end-of-text is run and bottlenecked (causal: later columns never
reach the end-of-text token). Images go through the model's own CLIPImageProcessor (shortest side
resized, centre crop), whose normalisation is kept as a separate step for display; its PIL backend, the
processor of transformers 4.x that the release ran (5.x defaults to a torchvision backend whose bicubic
resize differs by up to 0.03 in normalised units, measured here on 224 px crops). The PIL backend gives
open_clip's transform exactly, except that it rounds the crop offset down (open_clip rounds half to even).

The layers are written out (run_clip_layer) so that attention can be recorded with its graph, including
each block's q/k/v, per-head output and hidden state for Grad-ECLIP and LeGrad; the pooled token is the class
token (image) or end-of-text (text), and embed_hidden sends any block's hidden state through the tower's own
head (post_layernorm / final_layer_norm of that token, projection).

open_clip_state_dict() converts the weights to open_clip's CLIP layout (the bridge test shows both
adapters give the same embeddings, M2IB maps and Grad-ECLIP / LeGrad maps from the same weights).
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from m2ib.core.errors import InputError, ModelUnavailableError, UnsupportedError
from m2ib.core.records import TextBatch
from m2ib.models import offline
from m2ib.models.base import ModelAdapter, add_attention_parts
from m2ib.models.open_clip_vit import bpe_row_strings

PREFIX = "hf:"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ---- one CLIP encoder layer, written out -------------------------------------------------------------------
def causal_mask(length: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(1, 1, L, L) additive mask: 0 on and below the diagonal, the dtype's minimum above (as HF does)."""
    upper = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(length, length, dtype=dtype, device=device).masked_fill(upper, torch.finfo(dtype).min)[None, None]


def run_clip_layer(layer, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                   query_index: Optional[torch.Tensor] = None, record: Optional[list] = None) -> torch.Tensor:
    """One CLIPEncoderLayer: x (B, N, C) -> (B, N, C), or (B, 1, C) when query_index (B,) picks one query
    per row. mask: (1, 1, N, N) additive or None. Without record/query_index this is the module call (so
    forward hooks, e.g. pytorch-grad-cam's, see it). With record, the attention probabilities and (when
    record.parts is on) q/k/v/out/hidden are recorded (ModelAdapter.record_attention)."""
    if record is None and query_index is None:
        out = layer(x, mask)
        return out[0] if isinstance(out, tuple) else out
    attn = layer.self_attn
    B, N, C = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    h = layer.layer_norm1(x)
    x_q, h_q = x, h
    if query_index is not None:
        rows = torch.arange(B, device=x.device)
        x_q, h_q = x[rows, query_index][:, None], h[rows, query_index][:, None]
        mask = mask[0, 0][query_index][:, None, None, :] if mask is not None else None
    Q = x_q.shape[1]
    q = attn.q_proj(h_q).view(B, Q, heads, hd).transpose(1, 2)
    k = attn.k_proj(h).view(B, N, heads, hd).transpose(1, 2)
    v = attn.v_proj(h).view(B, N, heads, hd).transpose(1, 2)
    mask = mask.to(q.dtype) if mask is not None else None      # q is bf16 under CUDA autocast (M2IB amp)
    if record is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
    else:
        scores = (q @ k.transpose(-2, -1)) * attn.scale
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1)
        record.append(probs)
        out = probs @ v
    y = x_q + attn.out_proj(out.transpose(1, 2).reshape(B, Q, C))
    y = y + layer.mlp(layer.layer_norm2(y))
    add_attention_parts(record, q=q, k=k, v=v, out=out, hidden=y)
    return y


# ---- the adapter ------------------------------------------------------------------------------------------
class HFCLIPAdapter(ModelAdapter):
    family = "hf_clip"
    resize_mode = "shortest-floor"    # CLIPImageProcessor: resize the shortest side, centre crop rounded down

    def __init__(self, model, preprocess, tokenizer, name: str, device="cpu"):
        from transformers import CLIPModel
        if not isinstance(model, CLIPModel):
            raise UnsupportedError(f"{name}: {type(model).__name__} is not a transformers CLIPModel")
        self._wrap(model, preprocess, tokenizer, name, device)
        self.vision, self.text = self.model.vision_model, self.model.text_model
        vcfg, tcfg = self.model.config.vision_config, self.model.config.text_config
        self.image_size = (int(vcfg.image_size),) * 2
        self.grid_size = (int(vcfg.image_size) // int(vcfg.patch_size),) * 2
        self.num_layers = {"image": len(self.vision.encoder.layers), "text": len(self.text.encoder.layers)}
        self.context_length = int(tcfg.max_position_embeddings)
        self._legacy_eos = self.text.eos_token_id == 2      # HF pools at argmax(ids) then (see module doc)
        vocab = tokenizer.get_vocab()
        if len(tokenizer) > tcfg.vocab_size:
            raise InputError(f"{name}: the tokenizer has {len(tokenizer)} tokens but the text tower only "
                             f"{tcfg.vocab_size}: tokenizer and weights are from different models")
        # the token the open_clip adapter blanks words with: '!' (same id in the OpenAI vocabulary)
        self.blank_token_id = int(vocab.get("!</w>", tokenizer.unk_token_id or 0))
        self._decoder = {i: t for t, i in vocab.items()}
        from open_clip.tokenizer import bytes_to_unicode
        self._byte_decoder = {v: k for k, v in bytes_to_unicode().items()}
        self._special = (tokenizer.bos_token_id, tokenizer.eos_token_id)

    # ---- inputs -------------------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str]) -> TextBatch:
        captions = list(captions)
        tok = self.tokenizer
        truncated = self._check_captions(captions, lambda c: tok(c, add_special_tokens=False, verbose=False).input_ids)
        rows = tok(captions, truncation=True, max_length=self.context_length).input_ids
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(rows), self.context_length), int(pad), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        eos = torch.tensor([len(r) - 1 for r in rows])
        eot = self._pool_position(ids)
        if not torch.equal(eot, eos) or not (ids[torch.arange(len(rows)), eos] == tok.eos_token_id).all():
            raise UnsupportedError(f"{self.name}: the text tower pools at positions {eot.tolist()} but the "
                                   f"tokenizer's end-of-text tokens are at {eos.tolist()}: config eos_token_id "
                                   f"{self.text.eos_token_id} does not fit tokenizer eos {tok.eos_token_id}")
        pos = torch.arange(ids.shape[1])[None]
        word_mask = (pos > 0) & (pos < eot[:, None])
        tokens = [bpe_row_strings(r.tolist(), e, self._decoder, self._byte_decoder, self._special)
                  for r, e in zip(ids, eot.tolist())]
        return TextBatch(ids.to(self.device), eot.to(self.device), tokens, word_mask.to(self.device),
                         truncated, captions)

    def _pool_position(self, ids: torch.Tensor) -> torch.Tensor:
        """The position the HF text tower pools, by its own rule."""
        if self._legacy_eos:
            return ids.to(torch.int).argmax(dim=-1).long()
        return (ids == self.text.eos_token_id).int().argmax(dim=-1).long()

    # ---- text helpers ---------------------------------------------------------------------------
    def _text_len(self, text: TextBatch) -> int:
        """Columns run: up to the batch's last end-of-text token (causal: later ones never reach it)."""
        return int(text.eot.max()) + 1

    def _text_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """The end-of-text token's hidden state (B, C) -> final norm -> projection -> normalised."""
        return F.normalize(self.model.text_projection(self.text.final_layer_norm(pooled)), dim=-1)

    def _run_text(self, x: torch.Tensor, layers, record) -> torch.Tensor:
        mask = causal_mask(x.shape[1], x.dtype, x.device)
        for lyr in layers:
            x = run_clip_layer(lyr, x, mask, record=record)
        return x

    # ---- split encoders ---------------------------------------------------------------------------
    def prefix(self, modality: str, inputs, layer: int) -> torch.Tensor:
        layer = self.check_layer(modality, layer)
        rec = self._record[modality]
        if modality == "image":
            x = self.vision.pre_layrnorm(self.vision.embeddings(inputs.to(self.device)))
            for lyr in self.vision.encoder.layers[: layer + 1]:
                x = run_clip_layer(lyr, x, record=rec)
            return x
        x = self.text.embeddings(input_ids=inputs.ids[:, : self._text_len(inputs)])
        return self._run_text(x, self.text.encoder.layers[: layer + 1], rec)

    def suffix(self, modality: str, hidden: torch.Tensor, inputs, layer: int) -> torch.Tensor:
        layer = self.check_layer(modality, layer)
        rec = self._record[modality]
        x = hidden
        if modality == "image":
            *middle, last = list(self.vision.encoder.layers[layer + 1:])
            for lyr in middle:
                x = run_clip_layer(lyr, x, record=rec)
            cls = None if rec is not None else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            return self._image_head(run_clip_layer(last, x, query_index=cls, record=rec))
        copies = hidden.shape[0] // len(inputs)
        eot = inputs.eot.repeat_interleave(copies)
        mask = causal_mask(x.shape[1], x.dtype, x.device)
        *middle, last = list(self.text.encoder.layers[layer + 1:])
        for lyr in middle:
            x = run_clip_layer(lyr, x, mask, record=rec)
        if rec is None:
            pooled = run_clip_layer(last, x, mask, query_index=eot)[:, 0]
        else:
            x = run_clip_layer(last, x, mask, record=rec)
            pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        return self._text_head(pooled)

    def run_blocks(self, modality: str, hidden: torch.Tensor, inputs, start: int, stop: int) -> torch.Tensor:
        """Layers start+1 .. stop, written out like prefix() (multi-layer M2IB passes between its bottlenecks)."""
        start, stop = self.check_block_span(modality, start, stop)
        rec = self._record[modality]
        if modality == "image":
            x = hidden
            for lyr in self.vision.encoder.layers[start + 1: stop + 1]:
                x = run_clip_layer(lyr, x, record=rec)
            return x
        return self._run_text(hidden, self.text.encoder.layers[start + 1: stop + 1], rec)

    def _image_head(self, x: torch.Tensor) -> torch.Tensor:
        """Image hidden state (B, N, C) -> post_layernorm of the class token -> projection -> normalised."""
        return F.normalize(self.model.visual_projection(self.vision.post_layernorm(x[:, 0])), dim=-1)

    def _text_positions(self, text: TextBatch) -> torch.Tensor:
        return torch.arange(self._text_len(text), device=self.device)[None] <= text.eot[:, None]

    def embed_tokens(self, text: TextBatch) -> torch.Tensor:
        return self.text.embeddings.token_embedding(text.ids)

    def encode_text_from_embeddings(self, embeddings: torch.Tensor, text: TextBatch) -> torch.Tensor:
        x = self.text.embeddings(inputs_embeds=embeddings)
        x = self._run_text(x, self.text.encoder.layers, self._record["text"])
        return self._text_head(x[torch.arange(x.shape[0], device=x.device), text.eot])

    # ---- hooks -----------------------------------------------------------------------------------------
    supports_attention_parts = True

    def embed_hidden(self, modality: str, hidden: torch.Tensor, inputs) -> torch.Tensor:
        if modality == "image":
            return self._image_head(hidden)
        return self._text_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), inputs.eot])

    def _blocks(self, modality: str):
        return self.vision.encoder.layers if modality == "image" else self.text.encoder.layers

    def randomization_order(self, modality: str):
        if modality == "image":
            v = self.vision
            head = [self.model.visual_projection.weight, *v.post_layernorm.parameters()]
            stem = [*v.embeddings.parameters(), *v.pre_layrnorm.parameters()]
        else:
            v = self.text
            head = [self.model.text_projection.weight, *v.final_layer_norm.parameters()]
            stem = list(v.embeddings.parameters())
        layers = v.encoder.layers
        groups = [(f"{modality}.projection", head)]
        groups += [(f"{modality}.block{i}", list(layers[i].parameters())) for i in reversed(range(len(layers)))]
        return groups + [(f"{modality}.embeddings", stem)]


# ---- preprocessing ------------------------------------------------------------------------------------------
class ImageProcessorSteps:
    """The model's CLIPImageProcessor up to (not including) normalisation: PIL image -> (3, H, W) in [0, 1]."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, do_normalize=False, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"ImageProcessorSteps({type(self.processor).__name__})"


def preprocess_from_processor(processor, image_size: int, name: str):
    """torchvision Compose([processor steps, Normalize]) (the adapter reads mean/std from Normalize). Boxes are
    mapped as resize-shortest-side-to-the-crop + centre crop, so the processor must do exactly that."""
    from torchvision import transforms
    crop = getattr(processor, "crop_size", None) or {}
    size = getattr(processor, "size", None) or {}
    cropped = getattr(processor, "do_center_crop", False) and (crop.get("height"), crop.get("width")) == (image_size,) * 2
    if not cropped or size.get("shortest_edge") != image_size:
        raise UnsupportedError(
            f"{name}: preprocessor_config.json must resize the shortest side to {image_size} and centre-crop "
            f"{image_size}x{image_size} (the vision tower's input, as CLIP's processor does), got size={dict(size)}, "
            f"do_center_crop={getattr(processor, 'do_center_crop', None)}, crop_size={dict(crop)}")
    return transforms.Compose([ImageProcessorSteps(processor),
                               transforms.Normalize(processor.image_mean, processor.image_std)])


# ---- loading --------------------------------------------------------------------------------------------------
def target_of(name: str) -> str:
    """'hf:openai/clip-vit-base-patch32' -> the hub id or folder."""
    return name[len(PREFIX):].strip()


def is_local(target: str) -> bool:
    """A folder: one that exists, or any path that is not shaped like a Hub id 'org/repo'."""
    return Path(target).expanduser().exists() or not _HUB_ID.fullmatch(target)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' progress bars and load reports: our own checks say what is wrong instead."""
    from transformers.utils import logging as hf_logging
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _has_file(target: str, names, cache_dir) -> bool:
    from transformers.utils.hub import cached_file
    for n in names:
        try:
            if cached_file(target, n, cache_dir=cache_dir, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False) is not None:
                return True
        except OSError:
            pass
    return False


def _refuse_config(name: str, config) -> None:
    kind = getattr(config, "model_type", type(config).__name__)
    if kind in ("siglip", "siglip2"):
        raise UnsupportedError(
            f"{name}: SigLIP is not supported by the HF CLIP adapter: its text tower is bidirectional and pools "
            f"the LAST position of a 64-token padded sequence (a padding token), so the release's start..end-of-text "
            f"text bottleneck has no counterpart, and its image tower has no class token but an attention-pool "
            f"head; use a CLIPModel (e.g. hf:openai/clip-vit-base-patch32)")
    if kind != "clip":
        raise InputError(f"{name}: config.json describes a {kind!r} model ({type(config).__name__}), not a CLIPConfig; "
                         f"model.name=hf:... needs a transformers CLIPModel folder or hub id")


def _check_loading(name: str, info: dict, what: str) -> None:
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        detail = "; ".join(f"{k.replace('_', ' ')}: {len(v)} (e.g. {v[0]})" for k, v in bad.items() if v)
        raise InputError(f"{name}: {what} do not match its config.json ({detail}); weights and config are from "
                         f"different models")


def build_hf_clip(source, device: str = "cpu", cache_dir: Optional[str] = None) -> HFCLIPAdapter:
    """The adapter of an 'hf:' source: config, weights, tokenizer and image processor from the folder or the
    Hub cache (cache only when offline), each missing piece refused with what to download and where."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel
    name, target = source.name, target_of(source.name)
    if int(transformers.__version__.split(".")[0]) < 5:
        raise UnsupportedError(f"{name}: the HF CLIP adapter is written against transformers 5.x (layer call, "
                               f"loading API); installed {transformers.__version__}: pip install 'transformers>=5'")
    local = is_local(target)
    is_offline = not local and (offline.env_offline() or not offline.hub_reachable())
    reason = ("offline: HF_HUB_OFFLINE is set" if offline.env_offline() else "offline: huggingface.co is unreachable") \
        if is_offline else "not found"

    def unavailable(what: str, exc: Optional[Exception] = None):
        why = reason if is_offline or exc is None else f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        return ModelUnavailableError(offline.hf_transformers_message(name, target, what, local, cache_dir, why))

    with offline.hub_offline_mode(is_offline), _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(target, cache_dir=cache_dir)
        except (OSError, ValueError) as exc:
            raise unavailable("config.json", exc) from exc
        _refuse_config(name, config)
        try:
            model, info = CLIPModel.from_pretrained(target, cache_dir=cache_dir, output_loading_info=True,
                                                    dtype=torch.float32)
        except OSError as exc:
            raise unavailable("the weights (model.safetensors)", exc) from exc
        except RuntimeError as exc:       # shape mismatches
            raise InputError(f"{name}: the weights do not match its config.json (shapes differ: "
                             f"{str(exc).splitlines()[0]}); weights and config are from different models") from exc
        _check_loading(name, info, "the weights")
        if not _has_file(target, ("tokenizer.json", "vocab.json"), cache_dir):
            raise unavailable("the tokenizer (tokenizer.json, or vocab.json + merges.txt)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(target, cache_dir=cache_dir)
            processor = AutoImageProcessor.from_pretrained(target, cache_dir=cache_dir, backend="pil")
        except (OSError, ValueError) as exc:
            raise unavailable("the tokenizer / preprocessor_config.json", exc) from exc
    if source.checkpoint is not None:
        state = _read_state_dict(name, source.checkpoint)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:       # shape mismatches
            raise InputError(f"{name}: the weights in {source.checkpoint} do not match its config.json "
                             f"({str(exc).splitlines()[-1].strip()})") from exc
        _check_loading(name, {"missing_keys": result.missing_keys, "unexpected_keys": result.unexpected_keys},
                       f"the keys of {source.checkpoint}")
    preprocess = preprocess_from_processor(processor, int(config.vision_config.image_size), name)
    return HFCLIPAdapter(model, preprocess, tokenizer, name=name, device=device)


def _read_state_dict(name: str, path: str) -> dict:
    """A CLIPModel state dict from a .safetensors or torch file; shape mismatches raise InputError."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{name}: could not read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    return state.get("state_dict", state) if isinstance(state, dict) else state


# ---- conversion to open_clip ---------------------------------------------------------------------------------------
def open_clip_state_dict(model) -> dict:
    """A transformers CLIPModel's weights in open_clip's CLIP (ViT) layout.

    Load into open_clip.create_model(cfg) with the same widths/layers/heads/patch size, and with
    quick_gelu=True when the HF config's hidden_act is 'quick_gelu' (OpenAI's checkpoints). The mapping:
    q/k/v_proj -> attn.in_proj (stacked q, k, v); out_proj -> attn.out_proj; layer_norm1/2 -> ln_1/2;
    mlp.fc1/fc2 -> mlp.c_fc/c_proj; vision pre_layrnorm/post_layernorm -> visual.ln_pre/ln_post;
    patch_embedding -> visual.conv1; class/position embeddings -> visual.class_embedding/positional_embedding;
    text final_layer_norm -> ln_final; projections (Linear weights, out x in) -> transposed matrices
    visual.proj / text_projection; logit_scale as is.
    """
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"logit_scale": sd["logit_scale"],
           "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
           "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
           "visual.proj": sd["visual_projection.weight"].t().contiguous(),
           "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "text_projection": sd["text_projection.weight"].t().contiguous()}
    for hf, oc in (("vision_model.pre_layrnorm", "visual.ln_pre"), ("vision_model.post_layernorm", "visual.ln_post"),
                   ("text_model.final_layer_norm", "ln_final")):
        for p in ("weight", "bias"):
            out[f"{oc}.{p}"] = sd[f"{hf}.{p}"]
    towers = (("vision_model", "visual.transformer", model.config.vision_config.num_hidden_layers),
              ("text_model", "transformer", model.config.text_config.num_hidden_layers))
    for hf_tower, oc_tower, n in towers:
        for i in range(n):
            a, b = f"{hf_tower}.encoder.layers.{i}", f"{oc_tower}.resblocks.{i}"
            for p in ("weight", "bias"):
                out[f"{b}.attn.in_proj_{p}"] = torch.cat([sd[f"{a}.self_attn.{x}_proj.{p}"] for x in "qkv"])
                for hf, oc in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                               ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                    out[f"{b}.{oc}.{p}"] = sd[f"{a}.{hf}.{p}"]
    return out
