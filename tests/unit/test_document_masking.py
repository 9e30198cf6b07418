"""Document masking: a packed batch with positions restarting per document trains exactly as the documents alone."""

import pytest
import torch
import torch.nn.functional as F

from qwen2_dist.errors import UserError
from qwen2_dist.model.args import ModelArgs, get_model_args
from qwen2_dist.model.attention import attention, document_mask, resolve_backend
from qwen2_dist.model.qwen2 import build_model

SEQ = 16
# Two packed rows: documents of 5, 9 and 2 tokens, then one of 16.
DOCS_PER_ROW = [[5, 9, 2], [16]]


def _model(backend: str):
    model = build_model(get_model_args("tiny"), "cpu")
    model.init_weights(0)
    model.set_attention_backend(backend)
    return model


def _batch():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (len(DOCS_PER_ROW), SEQ + 1), generator=gen)
    positions = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in DOCS_PER_ROW])
    return tokens[:, :-1], tokens[:, 1:], positions


def _loss_and_grads(model, inputs, targets, **kwargs):
    model.zero_grad()
    loss = F.cross_entropy(model(inputs, **kwargs).flatten(0, 1), targets.flatten(), reduction="sum")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_packed_documents_train_as_if_alone(backend):
    inputs, targets, positions = _batch()
    model = _model(backend)
    packed_loss, packed_grads = _loss_and_grads(model, inputs, targets, positions=positions, mask_documents=True)

    # Each document on its own (positions 0..n-1, nothing else to attend to), same targets, losses summed.
    model.zero_grad()
    alone_loss = torch.zeros(())
    for row, lengths in enumerate(DOCS_PER_ROW):
        start = 0
        for n in lengths:
            doc_in, doc_tg = inputs[row : row + 1, start : start + n], targets[row : row + 1, start : start + n]
            loss = F.cross_entropy(model(doc_in).flatten(0, 1), doc_tg.flatten(), reduction="sum")
            loss.backward()
            alone_loss += loss.detach()
            start += n
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-4)
    for name, param in model.named_parameters():
        # fp32 sums over the 151,936-token vocabulary in other groupings: the tied matrix's gradient (largest value
        # about 7) is up to 3e-5 off at seeds 0-2, 8e-5 with the earlier init; the tolerance scales with that largest
        # value. A document that saw another's tokens is off by far more (the loss alone by over 1e-2, below).
        atol = 2e-5 * max(1.0, param.grad.abs().max().item())
        torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-4, atol=atol, msg=name)

    # Without the mask the documents see each other: the loss differs.
    unmasked, _ = _loss_and_grads(model, inputs, targets, positions=positions)
    assert abs(unmasked.item() - packed_loss.item()) > 1e-2


def test_one_document_per_row_is_plain_causal_attention():
    inputs, targets, _ = _batch()
    model = _model("sdpa")
    positions = torch.arange(SEQ).expand(inputs.shape[0], -1)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs, positions, mask_documents=True), model(inputs), rtol=1e-5,
                                   atol=1e-5)


def test_mask_forms_for_each_backend():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    mask = document_mask(positions, "flash_attn")
    assert mask.cu_seqlens.tolist() == [0, 3, 5, 6, 12] and mask.max_seqlen == 6
    assert mask.cu_seqlens.dtype == torch.int32
    dense = document_mask(positions, "sdpa").dense
    assert dense.shape == (2, 1, 6, 6)
    assert dense[0, 0, 4].tolist() == [False, False, False, True, True, False]
    assert torch.equal(dense[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())


def test_backend_choice_with_document_masking():
    assert resolve_backend("auto", "cpu", document_masking=True) == "sdpa"
    with pytest.raises(UserError, match="FlexAttention has no backward pass on the CPU"):
        resolve_backend("flex", "cpu", document_masking=True)


def _qkv(heads=4, kv_heads=2, seq=12, dim=8):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, h, seq, dim, generator=gen).requires_grad_() for h in (heads, kv_heads, kv_heads)]


def test_sdpa_gradients_match_reference_with_and_without_documents():
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], list(range(12))])
    for documents in (False, True):
        outputs = {}
        for backend in ("sdpa", "reference"):
            q, k, v = _qkv()
            mask = document_mask(positions, backend) if documents else None
            out = attention(q, k, v, backend, mask)
            out.pow(2).sum().backward()
            outputs[backend] = [out.detach(), q.grad, k.grad, v.grad]
        for got, want in zip(outputs["sdpa"], outputs["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_matches_reference_forward():
    # FlexAttention has no CPU backward and the trainer refuses it on CPU; its forward runs (eager), which checks
    # the block mask our document_mask builds for it (the GPU check compares the compiled kernel, with gradients).
    from torch.nn.attention.flex_attention import flex_attention

    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], list(range(12))])
    q, k, v = (t.detach() for t in _qkv())
    block_mask = document_mask(positions, "flex").block_mask
    with torch.no_grad():
        out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
        want = attention(q, k, v, "reference", document_mask(positions, "reference"))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_without_document_masking_is_causal_across_documents(monkeypatch):
    """Positions that restart, with mask_documents=False: flex attends across the documents as SDPA does (it built
    the document mask from the positions anyway)."""
    from torch.nn.attention.flex_attention import flex_attention

    from qwen2_dist.model import attention as attention_module

    monkeypatch.setattr(attention_module, "_compiled_flex_attention", lambda: flex_attention)  # eager: CPU forward
    args = ModelArgs(97, 64, 1, 4, 2, 64, tie_word_embeddings=True)
    model = build_model(args, "cpu")
    model.init_weights(0)
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(6), torch.arange(6)]).expand(2, -1)
    out = {}
    with torch.no_grad():
        for backend in ("sdpa", "flex"):
            model.set_attention_backend(backend)
            out[backend] = (model(tokens, positions, mask_documents=False), model(tokens, positions,
                                                                                   mask_documents=True))
    torch.testing.assert_close(out["flex"][0], out["sdpa"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["flex"][1], out["sdpa"][1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["sdpa"][0], out["sdpa"][1], atol=1e-3)  # the two masks differ on this input
