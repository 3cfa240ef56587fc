"""ZeTT hypernetworks (ctd.transplant.zett): the published checkpoint layout, and new rows equal
to the hypernetwork applied to the base rows of each token's pieces."""

from __future__ import annotations

import copy

import pytest
import torch

from ctd.errors import CtdError
from ctd.tokens import byte_vocab
from ctd.transplant import zett
from ctd.transplant.run import transplant_model


def _roberta_layer(i: int) -> set[str]:
    pre = f"model.encoder.layer.{i}."
    mods = ["attention.self.query", "attention.self.key", "attention.self.value",
            "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
            "output.dense", "output.LayerNorm"]
    return {pre + m + p for m in mods for p in (".weight", ".bias")}


def _projector(name: str) -> set[str]:
    return {f"{name}.{m}.{p}" for m in ("dense1", "dense2", "ln") for p in ("weight", "bias")}


def test_zett_checkpoint_layout_is_the_published_one(hypernet):
    """The parameter names of ZeTT's PyTorch hypernetworks (hf_hypernet/modeling_hypernet.py
    of bminixhofer/zett), written out: loading a real checkpoint depends on them."""
    from safetensors import safe_open

    with safe_open(hypernet / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    def linear(name: str) -> set[str]:
        return {name + ".weight", name + ".bias"}

    expected = (
        {f"model.embeddings.{e}_embeddings.weight" for e in ("word", "position", "token_type")}
        | linear("model.embeddings.LayerNorm") | _roberta_layer(0)
        | {"fallback_embeddings.weight"}
        | linear("input_projection.0") | _projector("input_projection.1")
        | _projector("output_projection.0") | linear("output_projection.1")
        | _projector("output_projection_out.0") | linear("output_projection_out.1")
        | {f"{s}.{p}" for s in ("in_scaler", "scaler", "out_scaler") for p in "wb"}
        | linear("bias_projection")
    )
    assert keys == expected


def test_zett_rows_are_the_hypernetwork_on_the_base_pieces(gemma_untied, gemma_tok, smol_tok,
                                                            match, hypernet):
    """New rows = the hypernetwork applied to the base rows (input | lm_head) of the token's
    pieces under the base tokenizer; padding does not change a prediction."""
    model = copy.deepcopy(gemma_untied)
    e_in = model.get_input_embeddings().weight.detach().clone()
    e_out = model.get_output_embeddings().weight.detach().clone()
    report = transplant_model(model, gemma_tok, smol_tok, "zett", resources={"hypernet": hypernet})
    assert report["params"] == {"hypernet": str(hypernet)}
    net = zett.load(hypernet, 64, tied=False, base_rows=len(e_in))
    source = torch.cat([e_in, e_out], dim=1)
    pieces_of = byte_vocab(smol_tok).pieces
    words = [(i, pieces_of[i].decode()) for i in match.new_ids
             if pieces_of[i].strip().isascii() and pieces_of[i].strip().isalpha()][:20]
    assert len(words) == 20
    for i, text in words:
        pieces = gemma_tok(text, add_special_tokens=False)["input_ids"]
        for width in (net.maxlen, net.maxlen + 5):
            surface = torch.full((1, width), net.pad_id)
            surface[0, : len(pieces)] = torch.tensor(pieces[: net.maxlen])
            p_in, p_out = zett.predict(net, surface, source)
            assert torch.allclose(model.get_input_embeddings().weight[i], p_in[0], atol=1e-5)
            assert torch.allclose(model.get_output_embeddings().weight[i], p_out[0], atol=1e-5)
    with pytest.raises(CtdError, match="beyond the 262,145 ids the hypernetwork knows"):
        zett.predict(net, torch.tensor([[5, len(e_in) + 1]]), source)
