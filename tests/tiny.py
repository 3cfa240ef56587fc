"""Tiny random models (2 layers, hidden 64) over REAL tokenizers: fast, but real code paths."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config


def tiny_model(tokenizer, arch: str = "llama", tied: bool = True, seed: int = 0):
    """A 2-layer, hidden-64 causal LM whose vocabulary is the tokenizer's."""
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": tied,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    elif arch == "gemma3":
        config = Gemma3TextConfig(
            **common, head_dim=16, sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
        )
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tiny_hypernet(path, model, tokenizer, seed: int = 0, **overrides):
    """A random 1-layer ZeTT hypernetwork checkpoint for `model` (config.json + safetensors)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from ctd.transplant.zett import Hypernet

    path = Path(path)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    cfg = {"model_type": "zett_hypernetwork", "hn_surface_maxlen": 8, "hn_n_layers": 1,
           "n_embd": model.config.hidden_size, "hn_hidden_size": 32, "hn_intermediate_size": 64,
           "hn_num_attention_heads": 2, "hn_rescale_embeddings": True,
           "hn_embed_using_source_embeddings": True, "hn_single_head": False,
           "hn_predict_bias": True, "separate_out_embeddings": not tied,
           "original_vocab_size": len(tokenizer), "hn_n_extra_tokens": 0,
           "pad_token_id": tokenizer.pad_token_id} | overrides
    torch.manual_seed(seed)
    net = Hypernet(cfg, {"model.embeddings.position_embeddings.weight": (514, 32),
                         "model.embeddings.token_type_embeddings.weight": (1, 32)})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def write_vec(path, words, vectors, header=True):
    """Word vectors in fastText's .vec text format (optional "count dim" header)."""
    lines = [f"{len(words)} {vectors.shape[1]}"] if header else []
    lines += [w + " " + " ".join(f"{x:.6f}" for x in v) for w, v in zip(words, vectors, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def distill_config(root, **train):
    """A quick distill config over `zoo_dir` (tests/conftest.py): tiny Qwen-tokenizer teacher,
    tiny SmolLM2-tokenizer student, ALM + 0.1 CLM, 4 steps of 4 x 48 tokens."""
    from ctd.config import DataConfig, DistillConfig, ModelsConfig, OptimConfig, TrainConfig
    from ctd.losses.objective import LossSpec

    return DistillConfig(
        models=ModelsConfig(teacher=str(root / "teacher"), student=str(root / "student"),
                            teacher_dtype="float32"),
        data=DataConfig(corpus=str(root / "corpus.txt"), max_length=48, batch_size=4,
                        val_documents=8, val_batch_size=8),
        losses=[LossSpec("alm"), LossSpec("clm", weight=0.1)], balance="fixed",
        optim=OptimConfig(lr=3e-3, warmup_steps=1),
        train=TrainConfig(**{"max_steps": 4, "val_every": 0, "checkpoint_every": 100,
                             "progress": False, "precision": "32-true", **train}),
    )


def tiny_gguf(path, vocab_gguf, hidden: int = 16, seed: int = 0) -> dict:
    """A one-layer Llama GGUF with fp32 tensors over the vocabulary of `vocab_gguf` (a
    vocabulary-only GGUF); returns the tensors written, by GGUF name."""
    import gguf
    import numpy as np

    src = gguf.GGUFReader(vocab_gguf)

    def array(key: str) -> list:  # parts/data: the reader API of every gguf ctd admits (>= 0.10)
        field = src.fields[key]
        return [field.parts[i].tolist() for i in field.data]

    tokens = [bytes(t).decode() for t in array("tokenizer.ggml.tokens")]
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              **{f"blk.0.{n}.weight": (hidden, hidden) for n in ("attn_q", "attn_k", "attn_v",
                                                                 "attn_output")},
              "blk.0.ffn_gate.weight": (2 * hidden, hidden), "blk.0.ffn_up.weight": (2 * hidden, hidden),
              "blk.0.ffn_down.weight": (hidden, 2 * hidden)}
    tensors = {n: rng.standard_normal(s).astype(np.float32) * 0.1 for n, s in shapes.items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(2 * hidden)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // 2)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([v[0] for v in array("tokenizer.ggml.scores")])
    w.add_token_types([v[0] for v in array("tokenizer.ggml.token_type")])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors
