"""The model adapter interface: the only place that knows a model family's internals.

Methods (M2IB, baselines) and metrics talk to a model exclusively through this interface, so a new
family (open_clip ResNet, hf-hub timm/BERT towers, HF transformers CLIP) is one new adapter.

Conventions
- modality is "image" or "text".
- `layer` l means the hidden state AFTER block l (0-based). Valid bottleneck layers are
  0 .. last_valid_layer(modality): num_layers - 2 where only one pooled token (class token, end of
  text) reaches the embedding after the last block, num_layers - 1 where every position still does
  (attention-pool head, mean pooling).
- Embeddings returned by encode/suffix are L2-normalised.
- Image tensors are preprocessed (B, 3, H, W); text goes as a TextBatch.
"""
from __future__ import annotations

import abc
import contextlib
import copy as _copy
import hashlib
import warnings
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from m2ib.core.attributor import MODALITIES
from m2ib.core.errors import InputError, UnsupportedError
from m2ib.core.geometry import boxes_to_input_frame
from m2ib.core.records import TextBatch
from m2ib.core.registry import Registry

#: The rule for models without published M2IB settings: the release's layer 9 where the tower is deep
#: enough, else its last valid bottleneck layer (last_valid_layer); the release's beta 0.1.
DEFAULT_M2IB_LAYER, DEFAULT_M2IB_BETA = 9, 0.1


#: Adapter families for built open_clip models, by name: each adapter module registers its class
#: (register_family) and the class's `serves(model)` says which built models it handles, so
#: models.sources picks the family without a list of them: a new family is one module.
ADAPTER_FAMILIES: Registry = Registry("adapter family", discover=("m2ib.models",))


def register_family(cls):
    """Class decorator: register an adapter class under its `family` name."""
    return ADAPTER_FAMILIES.register(cls.family, cls)


class ModelAdapter(abc.ABC):
    """A frozen, eval-mode CLIP-like model seen through a small, model-agnostic surface."""

    name: str
    family: str
    model: torch.nn.Module          # the wrapped model (frozen); read only inside m2ib/models/
    device: torch.device
    image_size: tuple[int, int]     # preprocessed (H, W)
    grid_size: tuple[int, int]      # patch grid (rows, cols) of the image tokens
    num_layers: dict[str, int]      # blocks per modality
    context_length: int
    blank_token_id: int             # token used to "remove" a word (faithfulness metrics)
    resize_mode: str                # open_clip's image resize mode ('shortest', 'longest', 'squash')
    num_prefix: int = 1             # class/prefix tokens before the patch tokens of the image hidden state
    m2ib_defaults: dict             # the model's M2IB image_/text_ layer and beta (set by models.sources)

    @classmethod
    def serves(cls, model) -> bool:
        """Whether this family handles a built open_clip `model` (families registered with
        register_family are asked in name order; at most one may answer yes)."""
        return False

    def _wrap(self, model, preprocess, tokenizer, name: str, device) -> None:
        """Common set-up: the model frozen in eval mode on `device`, its preprocessing and tokenizer."""
        self.name = name
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._preprocess = preprocess
        self.tokenizer = tokenizer
        self._record: dict[str, Optional[list]] = {"image": None, "text": None}
        self.pixel_mean, self.pixel_std = _normalisation(preprocess)
        self.m2ib_defaults = {}

    def default_m2ib_settings(self) -> dict:
        """image_/text_ layer and beta for M2IB: the model's published values (m2ib_defaults), else the
        rule DEFAULT_M2IB_LAYER clipped to the tower's last valid layer, DEFAULT_M2IB_BETA."""
        out = {}
        for m in MODALITIES:
            out[f"{m}_layer"] = self.m2ib_defaults.get(f"{m}_layer", min(DEFAULT_M2IB_LAYER, self.last_valid_layer(m)))
            out[f"{m}_beta"] = self.m2ib_defaults.get(f"{m}_beta", DEFAULT_M2IB_BETA)
        return out

    # ---- inputs -------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, 3, H, W) tensor on self.device, exactly as the model was trained."""
        out = []
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise InputError(f"image {i} is a {type(im).__name__}, not a PIL image")
            out.append(self._preprocess(im.convert("RGB")))
        if not out:
            raise InputError("no images given")
        return torch.stack(out).to(self.device)

    def _check_captions(self, captions: Sequence[str], encode: Callable[[str], list], n_special: int = 2) -> list[bool]:
        """Reject empty captions (naming them) and flag, with a warning, those longer than the context;
        encode(caption) gives its word-piece ids without the n_special start/end tokens the tokenizer
        adds (2 for CLIP and BERT, 1 for SigLIP's end token). Returns the truncated flags."""
        if not captions:
            raise InputError("no captions given")
        truncated = []
        for i, c in enumerate(captions):
            if not isinstance(c, str) or not c.strip():
                raise InputError(f"caption {i} is empty or not a string: {c!r}")
            body = encode(c)
            if not body:
                raise InputError(f"caption {i} has no tokens after cleaning: {c!r}")
            cut = len(body) + n_special > self.context_length
            if cut:
                warnings.warn(f"caption {i} has {len(body) + n_special} tokens, more than the context length "
                              f"{self.context_length}; truncated: {c[:60]!r}...", stacklevel=3)
            truncated.append(cut)
        return truncated

    @abc.abstractmethod
    def tokenize(self, captions: Sequence[str]) -> TextBatch:
        """Captions -> TextBatch on self.device. Empty captions raise InputError; over-long ones are
        truncated with a warning and flagged in TextBatch.truncated."""

    def box_to_input_frame(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(K, 4) x, y, w, h boxes in original pixels (original_size = (width, height)) -> the same
        boxes in the preprocessed frame (after resize + centre crop), clipped to it."""
        return boxes_to_input_frame(boxes, original_size, (self.image_size[1], self.image_size[0]),
                                    self.resize_mode)

    # ---- whole encoders -----------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) normalised embedding: block 0, then the rest (prefix + suffix, which
        tests show equal to the model's own encode)."""
        return self.suffix("image", self.prefix("image", pixels, 0), pixels, 0)

    def encode_text(self, text: TextBatch) -> torch.Tensor:
        """TextBatch -> (B, D) normalised embedding."""
        return self.suffix("text", self.prefix("text", text, 0), text, 0)

    def encode(self, modality: str, inputs) -> torch.Tensor:
        return self.encode_image(inputs) if modality == "image" else self.encode_text(inputs)

    def similarity(self, pixels: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """The explained scalar: cosine similarity of each pair's normalised embeddings, (B,). Every
        method explains it and every faithfulness metric re-scores it (Wang et al. 2023, Eq. 5)."""
        return (self.encode_image(pixels) * self.encode_text(text)).sum(-1)

    # ---- split encoders (the bottleneck sits between prefix and suffix) --------------------
    @abc.abstractmethod
    def prefix(self, modality: str, inputs, layer: int) -> torch.Tensor:
        """Hidden state after block `layer`: (B, N, C) for images (N includes any class token),
        (B, T', C) for text where T' may be shorter than the context (cut after the last EOT)."""

    @abc.abstractmethod
    def suffix(self, modality: str, hidden: torch.Tensor, inputs, layer: int) -> torch.Tensor:
        """The rest of the encoder from the hidden state after block `layer` to the normalised
        embedding. `hidden` may have more rows than `inputs` (copies): rows are grouped so that
        row r belongs to input r // (len(hidden) // len(inputs))."""

    def run_blocks(self, modality: str, hidden: torch.Tensor, inputs, start: int, stop: int) -> torch.Tensor:
        """The hidden state after block `stop` from the hidden state after block `start` (start < stop,
        both valid bottleneck layers): blocks start+1 .. stop, with gradients. `hidden` may have copies
        rows, grouped as in suffix(). Multi-layer M2IB uses it to pass between its bottlenecks.

        This default needs record_attention(parts=True): it runs suffix() from `start` while recording
        and reads the output of block `stop` (the blocks after `stop` run for nothing). Adapters
        override it with a plain loop over their blocks."""
        start, stop = self.check_block_span(modality, start, stop)
        if not self.supports_attention_parts:
            raise UnsupportedError(f"model {self.name} ({self.family}) cannot run its {modality} blocks "
                                   f"{start + 1}..{stop} alone (no run_blocks, no recorded block outputs)")
        with self.record_attention(modality, parts=True) as rec:
            self.suffix(modality, hidden, inputs, start)
        return rec.parts[stop - start - 1]["hidden"]

    def token_positions(self, modality: str, inputs) -> torch.Tensor:
        """(B, N) bool: which positions of prefix()'s hidden state are real inputs (image: all;
        text: start-of-text .. end-of-text, no padding)."""
        if modality == "image":
            n = self.grid_size[0] * self.grid_size[1] + self.num_prefix
            return torch.ones(inputs.shape[0], n, dtype=torch.bool, device=self.device)
        return self._text_positions(inputs)

    @abc.abstractmethod
    def _text_positions(self, text: TextBatch) -> torch.Tensor:
        """token_positions for text."""

    def pooled_position(self, modality: str, inputs) -> Optional[torch.Tensor]:
        """(B,) long: the one position of the hidden state whose last-block output alone becomes the
        embedding (the class token of an image, the end-of-text token of a causal CLIP caption; adapters
        with other pooling override it: [CLS] for BERT, the last position for SigLIP's text), or None
        where the tower pools several positions (attention-pool head, mean, a ResNet's attention pool).
        The one hook for "which token is pooled": attention baselines read its attention row,
        Grad-ECLIP its query; both refuse a None (baselines.base.require_pooled_position)."""
        if modality == "image":
            return torch.zeros(inputs.shape[0], dtype=torch.long, device=inputs.device)
        return inputs.eot

    def last_valid_layer(self, modality: str) -> int:
        """The last block whose output may carry a bottleneck. After the last block only the pooled
        token reaches the embedding when the tower pools one token (a bottleneck there explains
        nothing), so the default is the second-to-last block; adapters whose tower pools every
        position (attention-pool head, mean) override it with the last block."""
        return self.num_layers[modality] - 2

    def hidden_to_image_map(self, values: torch.Tensor) -> torch.Tensor:
        """(B, N) per-token values of the image hidden state -> (B, H, W) map in the preprocessed
        frame (class/prefix tokens dropped, grid bilinearly upsampled)."""
        gh, gw = self.token_grid(values.shape[1] - self.num_prefix)
        grid = values[:, self.num_prefix:].reshape(values.shape[0], 1, gh, gw).float()
        return F.interpolate(grid, size=self.image_size, mode="bilinear", align_corners=False)[:, 0]

    def token_grid(self, n_tokens: int) -> tuple[int, int]:
        """(rows, cols) of an image hidden state with n_tokens positions after the prefix tokens: the
        patch grid; families whose grid depends on the layer (ResNet stages) override this."""
        return self.grid_size

    def hidden_to_text_scores(self, values: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """(B, T') per-position values of the text hidden state -> (B, T) scores on the TextBatch
        positions, zero outside the word tokens."""
        out = torch.zeros(text.ids.shape, dtype=torch.float32, device=values.device)
        width = min(values.shape[1], out.shape[1])
        out[:, :width] = values[:, :width].float()
        return out * text.word_mask.to(out.device)

    # ---- hooks for baselines and sanity checks ----------------------------------------------
    #: Whether record_attention(modality, parts=True) is implemented (see there); False refuses it.
    supports_attention_parts: bool = False

    @contextlib.contextmanager
    def record_attention(self, modality: str, parts: bool = False) -> Iterator[list]:
        """Context manager; yields a list that fills with one (B, heads, N, N) attention-probability
        tensor per block (graph kept, so gradients w.r.t. them are available) during encodes.
        Adapters read self._record[modality] in their block loops.

        parts=True (adapters with supports_attention_parts; Grad-ECLIP, LeGrad): the yielded
        AttentionRecord's `.parts` also gets, per block in order, a dict of that block's tensors, all
        with their graph and all queries (no query_index shortcut while recording):
          q, k, v: (B, heads, N, head_dim), query/key/value per head as the softmax uses them (q NOT
                   yet scaled by 1/sqrt(head_dim); after any q/k normalisation the block applies);
          out:     (B, heads, N, head_dim), softmax(q k^T * scale + mask) v per head, BEFORE the heads
                   are merged and the output projection applied;
          hidden:  (B, N, C), the block's output (what prefix() returns after this block).
        Adapters fill it with add_attention_parts() from their written-out blocks."""
        if modality not in self._record:
            raise InputError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if parts and not self.supports_attention_parts:
            raise UnsupportedError(f"model {self.name} ({self.family}) does not report the per-block "
                                   f"query/key/value of its {modality} encoder (no transformer attention "
                                   f"exposed by this adapter)")
        if self._record[modality] is not None:
            raise RuntimeError(f"already recording {modality} attention")
        self._record[modality] = AttentionRecord(parts)
        try:
            yield self._record[modality]
        finally:
            self._record[modality] = None

    def embed_hidden(self, modality: str, hidden: torch.Tensor, inputs) -> torch.Tensor:
        """(B, N, C) hidden state after ANY block (as prefix() or record parts give it; rows = inputs)
        -> (B, D) normalised embedding through the tower's own pooling, final norm and projection,
        as if the remaining blocks were skipped. After the last block it equals encode(); LeGrad
        scores every block this way (a 'logit lens')."""
        raise UnsupportedError(f"model {self.name} ({self.family}) cannot project an intermediate "
                               f"{modality} hidden state to its embedding space")

    def gradcam_target(self, modality: str) -> tuple[torch.nn.Module, Callable]:
        """(module, reshape_transform) for pytorch-grad-cam: the block at last_valid_layer (the last
        block whose every token still reaches the embedding), and a function turning its (B, N, C)
        tokens into (B, C, rows, cols): the patch grid without prefix tokens (image), a 1 x N strip (text)."""
        module = self._blocks(modality)[self.last_valid_layer(modality)]
        if modality == "image":
            gh, gw, npre = *self.grid_size, self.num_prefix

            def reshape(t):
                return t[:, npre:].reshape(t.shape[0], gh, gw, t.shape[-1]).permute(0, 3, 1, 2)
            return module, reshape
        return module, lambda t: t.permute(0, 2, 1)[:, :, None, :]

    @abc.abstractmethod
    def _blocks(self, modality: str) -> Sequence[torch.nn.Module]:
        """The transformer blocks of one tower, in order."""

    @abc.abstractmethod
    def embed_tokens(self, text: TextBatch) -> torch.Tensor:
        """Input token embeddings (B, T, C) before position embeddings (for text gradients/IG)."""

    @abc.abstractmethod
    def encode_text_from_embeddings(self, embeddings: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """encode_text with the token embedding lookup replaced by `embeddings` (B, T, C)."""

    @abc.abstractmethod
    def randomization_order(self, modality: str) -> list[tuple[str, list[torch.nn.Parameter]]]:
        """Named parameter groups of one encoder, from the output (projection) down to the input
        embeddings, for cascading randomisation (Adebayo et al. 2018)."""

    def copy(self) -> "ModelAdapter":
        """An independent deep copy of the model (sanity checks and ROAR+ overwrite weights); the
        read-only tokenizer and preprocessing are shared, not copied (the BPE tables are large)."""
        return _copy.deepcopy(self, {id(self.tokenizer): self.tokenizer, id(self._preprocess): self._preprocess})

    def trainable_copy(self) -> tuple["ModelAdapter", list[torch.nn.Parameter]]:
        """(a deep copy, its parameters with requires_grad on) for fine-tuning (ROAR+); the copy stays
        in eval mode (no dropout), so a CPU fine-tune repeats bit for bit. This adapter stays frozen."""
        other = self.copy()
        params = list(other.model.parameters())
        for p in params:
            p.requires_grad_(True)
        return other, params

    def state_dict(self) -> dict:
        """The wrapped model's weights (checkpoints of fine-tuned copies)."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

    # ---- display ------------------------------------------------------------------------
    def to_display(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) preprocessed pixels -> (B, H, W, 3) float RGB in [0, 1], undoing the model's
        own normalisation (figures)."""
        mean = torch.tensor(self.pixel_mean)[:, None, None]
        std = torch.tensor(self.pixel_std)[:, None, None]
        img = pixels.detach().cpu().float() * std + mean
        return img.clamp(0, 1).permute(0, 2, 3, 1).numpy()

    # ---- shared checks -------------------------------------------------------------------
    def check_layer(self, modality: str, layer: int) -> int:
        if modality not in MODALITIES:
            raise InputError(f"modality must be one of {MODALITIES}, got {modality!r}")
        n, last = self.num_layers[modality], self.last_valid_layer(modality)
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
            raise InputError(f"{modality} layer must be an integer, got {layer!r}")
        if layer < 0 or layer > last:
            why = ("after the last block only the pooled token reaches the embedding, so a bottleneck there "
                   "explains nothing" if last < n - 1 else "every block's output still reaches the embedding")
            raise InputError(
                f"{modality} layer {layer} is out of range for {self.name} ({getattr(self, 'family', '?')}): "
                f"the {modality} encoder has {n} blocks, so valid bottleneck layers are 0..{last} ({why}); "
                f"pick one of those")
        return int(layer)

    def check_block_span(self, modality: str, start: int, stop: int) -> tuple[int, int]:
        """run_blocks' arguments: two valid bottleneck layers, start < stop."""
        start, stop = self.check_layer(modality, start), self.check_layer(modality, stop)
        if not start < stop:
            raise InputError(f"run_blocks needs start < stop, got {start} and {stop}")
        return start, stop

    def optimising(self):
        """A context for many forward and backward passes through suffix() / run_blocks() (M2IB's steps),
        where an adapter may run a faster form of its blocks that agrees to float32 rounding. open_clip
        blocks are then written out (m2ib.models.blocks); other methods, outside it, keep the module calls."""
        from m2ib.models.blocks import written_out_under_autograd   # blocks.py imports this module
        return written_out_under_autograd()

    def weights_digest(self) -> str:
        """sha256 over the model's parameters and buffers (names, shapes, dtypes and bytes, in order): what
        the attribution cache, the layer statistics and the readouts key the weights by, whatever their source
        (a checkpoint file, the Hub, a conversion). Remembered until a tensor is replaced or changed in place
        (its storage or torch's version counter changes), so a model is hashed once, and a copy whose weights
        were randomised or fine-tuned is hashed again."""
        state = self.model.state_dict()
        stamp = tuple((name, t.data_ptr(), t._version) for name, t in state.items())
        memo = self.__dict__.get("_weights_memo")
        if memo is not None and memo[0] == stamp:
            return memo[1]
        h = hashlib.sha256()
        for name, t in state.items():
            t = t.detach().cpu().contiguous()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        self._weights_memo = (stamp, h.hexdigest())
        return self._weights_memo[1]

    def parameters(self):
        return self.model.parameters()


class AttentionRecord(list):
    """record_attention's list of per-block attention probabilities; `.parts` is a list of per-block
    tensor dicts when parts were requested, else None."""

    def __init__(self, parts: bool = False):
        super().__init__()
        self.parts: Optional[list] = [] if parts else None


def add_attention_parts(record: Optional[list], **tensors: torch.Tensor) -> None:
    """Append one block's q/k/v/out/hidden to record.parts when parts are being recorded."""
    parts = getattr(record, "parts", None)
    if parts is not None:
        parts.append(tensors)


def _normalisation(preprocess) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the Normalize step of a torchvision preprocessing pipeline."""
    for t in getattr(preprocess, "transforms", []):
        if type(t).__name__ == "Normalize":
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    raise UnsupportedError(f"the model's preprocessing {preprocess!r} has no Normalize step; cannot map "
                           f"its pixels back to colours")
