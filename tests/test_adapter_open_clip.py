"""The open_clip ViT adapter is exact: split encoders and text cutting reproduce open_clip's own forward."""
import numpy as np
import pytest
import torch

from m2ib.core.errors import InputError


def test_prefix_suffix_reproduce_model_at_every_layer(tiny_adapter, pairs):
    a = tiny_adapter
    px, tb = a.preprocess(pairs[0]), a.tokenize(pairs[1])
    ref_img = a.model.encode_image(px, normalize=True)
    ref_txt = a.model.encode_text(tb.ids, normalize=True)     # open_clip runs all 77 positions
    for layer in range(a.num_layers["image"] - 1):
        out = a.suffix("image", a.prefix("image", px, layer), px, layer)
        torch.testing.assert_close(out, ref_img, atol=1e-5, rtol=1e-5)
    for layer in range(a.num_layers["text"] - 1):
        hidden = a.prefix("text", tb, layer)
        assert hidden.shape[1] == int(tb.eot.max()) + 1       # cut after the batch's last EOT
        torch.testing.assert_close(a.suffix("text", hidden, tb, layer), ref_txt, atol=1e-5, rtol=1e-5)


def test_suffix_accepts_copies(tiny_adapter, pairs):
    a = tiny_adapter
    tb = a.tokenize(pairs[1])
    hidden = a.prefix("text", tb, 1)
    out = a.suffix("text", hidden.repeat_interleave(4, 0), tb, 1)
    torch.testing.assert_close(out[::4], a.suffix("text", hidden, tb, 1))


def test_tokens_and_word_mask(tiny_adapter):
    tb = tiny_adapter.tokenize(["A big  Dog!"])
    words = [t for t, m in zip(tb.tokens[0], tb.word_mask[0].tolist()) if m]
    assert words == ["a", "big", "dog", "!"]
    assert tb.tokens[0][0] == "<start_of_text>" and tb.tokens[0][int(tb.eot[0])] == "<end_of_text>"


def test_empty_and_long_captions(tiny_adapter):
    with pytest.raises(InputError, match="caption 1"):
        tiny_adapter.tokenize(["ok", "   "])
    with pytest.warns(UserWarning, match="truncated"):
        tb = tiny_adapter.tokenize(["word " * 100])
    assert tb.truncated == [True] and int(tb.eot[0]) == tiny_adapter.context_length - 1


def test_layer_out_of_range_and_last_block_refused(tiny_adapter, pairs):
    px = tiny_adapter.preprocess(pairs[0][:1])
    n = tiny_adapter.num_layers["image"]
    for bad in (-1, n - 1, n, 2.5):
        with pytest.raises(InputError, match="layer"):
            tiny_adapter.prefix("image", px, bad)


def test_attention_recording_matches_plain_forward(tiny_adapter, pairs):
    a = tiny_adapter
    px, tb = a.preprocess(pairs[0]), a.tokenize(pairs[1])
    with a.record_attention("image") as att:
        emb = a.encode_image(px)
    assert len(att) == a.num_layers["image"]
    n_tok = a.grid_size[0] * a.grid_size[1] + 1
    assert att[0].shape[0] == 3 and att[0].shape[-2:] == (n_tok, n_tok)
    torch.testing.assert_close(att[0].sum(-1), torch.ones_like(att[0].sum(-1)))
    torch.testing.assert_close(emb, a.encode_image(px), atol=1e-5, rtol=1e-5)
    with a.record_attention("text") as att_t:
        a.encode_text(tb)
    assert len(att_t) == a.num_layers["text"]
    upper = torch.triu(torch.ones(att_t[0].shape[-2:], dtype=torch.bool), 1)
    assert att_t[0][..., upper].abs().max() == 0          # causal: no attention to later tokens


def test_box_mapping_follows_centre_crop(tiny_adapter):
    # 64x32 (w x h) image -> resize shortest side to 32 (64x32), centre crop 32: x offset 16.
    boxes = tiny_adapter.box_to_input_frame(np.array([[16.0, 0, 32, 32], [0, 0, 8, 8]]), (64, 32))
    np.testing.assert_allclose(boxes[0], [0, 0, 32, 32])
    np.testing.assert_allclose(boxes[1], [0, 0, 0, 8])        # cropped away entirely in x


def test_weights_frozen(tiny_adapter):
    assert not any(p.requires_grad for p in tiny_adapter.model.parameters())


def test_blocks_written_out_under_autograd_only_when_asked(tiny_adapter, pairs, monkeypatch):
    """run_block is the module call itself (bit for bit) outside written_out_under_autograd() and for a hooked
    block; inside it, a block autograd records is written out: equal output and input gradient to float32
    rounding (1e-5 is ~100x the observed difference), and nn.MultiheadAttention is not called."""
    from m2ib.models.blocks import run_block, written_out_under_autograd
    a = tiny_adapter
    for modality, inputs in (("image", a.preprocess(pairs[0])), ("text", a.tokenize(pairs[1]))):
        x = a.prefix(modality, inputs, 0).detach().requires_grad_(True)
        block = a._blocks(modality)[1]
        mask = None if modality == "image" else a._text_mask(x.shape[1])
        calls = []
        forward = block.attn.forward
        monkeypatch.setattr(block.attn, "forward", lambda *args, **kw: calls.append(1) or forward(*args, **kw))
        plain = block(x, attn_mask=mask)
        (grad_plain,) = torch.autograd.grad(plain.square().sum(), x)
        assert torch.equal(run_block(block, x, mask), plain) and len(calls) == 2
        with written_out_under_autograd():
            written = run_block(block, x, mask)
            assert len(calls) == 2
            handle = block.register_forward_hook(lambda *args: None)
            assert torch.equal(run_block(block, x, mask), plain) and len(calls) == 3
            handle.remove()
            with torch.no_grad():       # nothing recorded: the fused inference kernel, as outside
                run_block(block, x, mask)
            assert len(calls) == 4
        (grad_written,) = torch.autograd.grad(written.square().sum(), x)
        torch.testing.assert_close(written, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_written, grad_plain, rtol=1e-5, atol=1e-5)
        monkeypatch.undo()
