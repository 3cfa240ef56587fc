"""ZeTT (Minixhofer et al., 2024, "Zero-Shot Tokenizer Transfer") from a local hypernetwork.

A ZeTT hypernetwork is trained for one base model. It reads a token's pieces under the base
tokenizer (the token's "surface form", at most `hn_surface_maxlen` pieces), looks them up in the
base model's own embedding rows (input and lm_head side by side for an untied base), projects
them, runs a small RoBERTa encoder over them, and predicts the token's input embedding (and its
lm_head row, for an untied base) from the first position.

Checkpoints are read from a local directory in the layout of the published PyTorch ports:
`config.json` with the `hn_*` fields and `model.safetensors`. Nothing is downloaded and no remote
code runs: the architecture is rebuilt here from transformers' RobertaModel. As with every ctd
method, only the new tokens are predicted; shared tokens keep their base rows bit for bit.
A predicted lm_head bias (`hn_predict_bias`) is not used: the base models have no output bias.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ctd.errors import CtdError

_UNSUPPORTED = {  # config fields this runner does not implement (nor does the PyTorch port)
    "hn_embed_lang_id": "language ids (a multilingual hypernetwork)",
    "hn_add_inter_token_attention": "inter-token attention",
    "hn_embed_target_priors": "target-token priors",
    "hn_concat_last_hidden_state": "concatenated hidden states",
}
_REQUIRED = (  # config fields the architecture is built from
    "n_embd", "hn_hidden_size", "hn_intermediate_size", "hn_n_layers",
             "original_vocab_size", "pad_token_id")


def read_config(path: Path) -> dict:
    """The checkpoint's config, refusing what cannot be run, before anything is loaded."""
    path = Path(path).expanduser()
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CtdError(f"--hypernet {path} has no config.json; pass the directory of a ZeTT "
                       "hypernetwork checkpoint (config.json + model.safetensors)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("model_type") != "zett_hypernetwork" and "hn_n_layers" not in cfg:
        raise CtdError(f"--hypernet {path} is not a ZeTT hypernetwork (config.json has no hn_* "
                       "fields)")
    if not (path / "model.safetensors").is_file():
        if (path / "pytorch_model.bin").is_file():
            fix = ("ctd loads safetensors only; convert once with: python -c \"import torch; "
                   "from safetensors.torch import save_file; save_file(torch.load("
                   "'pytorch_model.bin', weights_only=True), 'model.safetensors')\"")
        elif (path / "flax_model.msgpack").is_file():
            fix = "it is a Flax checkpoint; convert it with ZeTT's scripts/convert_to_pt.py"
        else:
            fix = "the weights are missing"
        raise CtdError(f"--hypernet {path} has no model.safetensors: {fix}")
    missing = [key for key in _REQUIRED if cfg.get(key) is None]
    if missing:
        raise CtdError(f"--hypernet {path}: config.json lacks {', '.join(missing)}; is it a "
                       "complete ZeTT hypernetwork checkpoint?")
    used = [what for key, what in _UNSUPPORTED.items() if cfg.get(key)]
    if not cfg.get("hn_embed_using_source_embeddings", False):
        used.append("its own token embeddings instead of the base model's")
    if cfg.get("hn_model_type", "roberta") != "roberta":
        used.append(f"a {cfg['hn_model_type']} encoder")
    if used:
        raise CtdError(f"hypernetwork {path} uses {', '.join(used)}, which ctd cannot run; use a "
                       "monolingual ZeTT hypernetwork with a RoBERTa encoder")
    return cfg


class _Projector(nn.Module):
    """Residual MLP block with tanh-GELUs and a LayerNorm (ZeTT's ProjectorBlock)."""

    def __init__(self, dim: int, intermediate: int):
        super().__init__()
        self.dense1 = nn.Linear(dim, intermediate)
        self.dense2 = nn.Linear(intermediate, dim)
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.dense2(F.gelu(self.dense1(x), approximate="tanh")), approximate="tanh")
        return self.ln(h + x)


class _Rescale(nn.Module):
    """Learned per-dimension affine map between the base's and the encoder's scales."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, dim))
        self.b = nn.Parameter(torch.ones(1, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.w * x + self.b


class Hypernet(nn.Module):
    """The hypernetwork; parameter names follow the published checkpoints."""

    def __init__(self, cfg: dict, shapes: dict[str, torch.Size]):
        from transformers import RobertaConfig, RobertaModel

        super().__init__()
        self.n_embd = cfg["n_embd"]
        self.separate_out = bool(cfg.get("separate_out_embeddings", False))
        self.single_head = bool(cfg.get("hn_single_head", False))
        self.rescale = bool(cfg.get("hn_rescale_embeddings", False))
        self.vocab = cfg["original_vocab_size"]
        self.pad_id = cfg["pad_token_id"]
        self.maxlen = cfg.get("hn_surface_maxlen", 16)
        n_in = 2 * self.n_embd if self.separate_out else self.n_embd
        hidden, inter = cfg["hn_hidden_size"], cfg["hn_intermediate_size"]
        # the encoder config of roberta-base with ZeTT's overrides; table sizes from the weights
        emb = "model.embeddings."
        encoder = RobertaConfig(
            vocab_size=self.pad_id + 1, hidden_size=hidden, intermediate_size=inter,
            num_hidden_layers=cfg["hn_n_layers"],
            num_attention_heads=cfg.get("hn_num_attention_heads") or hidden // 64,
            hidden_act="gelu", layer_norm_eps=1e-5, pad_token_id=None, bos_token_id=None,
            eos_token_id=None,
            max_position_embeddings=shapes[emb + "position_embeddings.weight"][0],
            type_vocab_size=shapes[emb + "token_type_embeddings.weight"][0],
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.model = RobertaModel(encoder, add_pooling_layer=False)
        self.fallback_embeddings = nn.Embedding(max(cfg.get("hn_n_extra_tokens", 0), 1), n_in)
        self.input_projection = nn.Sequential(nn.Linear(n_in, hidden), _Projector(hidden, inter))
        self.output_projection = nn.Sequential(
            _Projector(hidden, inter), nn.Linear(hidden, n_in if self.single_head else self.n_embd))
        if self.separate_out and not self.single_head:
            self.output_projection_out = nn.Sequential(
                _Projector(hidden, inter), nn.Linear(hidden, self.n_embd))
        if self.rescale:
            self.in_scaler, self.scaler = _Rescale(n_in), _Rescale(self.n_embd)
            if self.separate_out:
                self.out_scaler = _Rescale(self.n_embd)
        if cfg.get("hn_predict_bias", True):
            self.bias_projection = nn.Linear(hidden, 1)

    def forward(self, surface: Tensor, source: Tensor) -> tuple[Tensor, Tensor | None]:
        """Embeddings (input, lm_head or None) for surface forms [n, L] of base ids padded with
        the pad id; `source` [V, D or 2D] is the base input embedding (with lm_head beside it)."""
        extra = surface >= self.vocab  # ids past the base vocabulary have their own rows
        x = F.embedding(surface.clamp_max(self.vocab - 1), source)
        if self.rescale:
            x = self.in_scaler(x)
        own = self.fallback_embeddings((surface - self.vocab).clamp_min(0))
        x = torch.where(extra[..., None], own, x)
        x = self.input_projection(x)
        positions = torch.arange(surface.shape[1]).expand_as(surface)  # from 0, not RoBERTa's 2
        h = self.model(inputs_embeds=x, attention_mask=(surface != self.pad_id).long(),
                       position_ids=positions).last_hidden_state[:, 0]
        out = self.output_projection(h)
        if self.single_head:
            e_in = out[:, : self.n_embd]
            e_out = out[:, self.n_embd :] if self.separate_out else None
        else:
            e_in = out
            e_out = self.output_projection_out(h) if self.separate_out else None
        if self.rescale:
            e_in = self.scaler(e_in)
            e_out = None if e_out is None else self.out_scaler(e_out)
        return e_in, e_out


def load(path: Path, hidden: int, tied: bool, base_rows: int) -> Hypernet:
    """The hypernetwork at `path`, checked against the base model it is applied to."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    cfg = read_config(path)
    trained_tied = not cfg.get("separate_out_embeddings", False)
    if cfg["n_embd"] != hidden or trained_tied != tied:
        def shape(d: int, t: bool) -> str:
            return f"hidden size {d} with {'tied' if t else 'untied'} embeddings"

        raise CtdError(f"hypernetwork {path} was trained for a model of "
                       f"{shape(cfg['n_embd'], trained_tied)}; the base has {shape(hidden, tied)}: "
                       "use the hypernetwork trained for this base model")
    if cfg["original_vocab_size"] > base_rows:
        raise CtdError(f"hypernetwork {path} was trained for a vocabulary of "
                       f"{cfg['original_vocab_size']:,} tokens; the base has {base_rows:,} rows: "
                       "use the hypernetwork trained for this base model")
    state = load_file(path / "model.safetensors")
    state.pop("model.embeddings.position_ids", None)  # a buffer older transformers saved
    try:
        net = Hypernet(cfg, {k: v.shape for k, v in state.items()})
        missing, unexpected = net.load_state_dict(state, strict=False)
    except (KeyError, RuntimeError) as e:
        raise CtdError(f"hypernetwork {path}: weights do not match its config "
                       f"({str(e)[:300]})") from e
    if missing or unexpected:
        raise CtdError(f"hypernetwork {path}: weights do not match its config (missing "
                       f"{missing[:3]}, unexpected {unexpected[:3]})")
    return net.eval()


def surface_forms(
    owner: Tensor, pieces: Tensor, n: int, maxlen: int, pad: int
) -> tuple[Tensor, int]:
    """Flat (target, base id) pairs in order -> [n, maxlen] padded with `pad`; also how many
    targets had more than `maxlen` pieces (cut, as ZeTT does)."""
    counts = torch.bincount(owner, minlength=n)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(len(owner)) - start[owner]
    keep = pos < maxlen
    out = torch.full((n, maxlen), pad, dtype=torch.long)
    out[owner[keep], pos[keep]] = pieces[keep]
    return out, int((counts > maxlen).sum())


@torch.inference_mode()
def predict(net: Hypernet, surface: Tensor, source: Tensor, batch: int = 1024,
            on_batch: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor | None]:
    """Run the hypernetwork over surface forms in batches: (input rows, lm_head rows or None)."""
    known = net.vocab + net.fallback_embeddings.num_embeddings
    if len(surface) and int(surface.max()) >= known:
        raise CtdError(f"base token id {int(surface.max())} is beyond the {known:,} ids the "
                       "hypernetwork knows: use the hypernetwork trained for this base tokenizer")
    e_in = torch.zeros(len(surface), net.n_embd)
    e_out = torch.zeros(len(surface), net.n_embd) if net.separate_out else None
    for s in range(0, len(surface), batch):
        i, o = net(surface[s : s + batch], source)
        e_in[s : s + len(i)] = i
        if e_out is not None:
            e_out[s : s + len(i)] = o
        if on_batch is not None:
            on_batch(len(i))
    return e_in, e_out
