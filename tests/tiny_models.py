"""Tiny random models of every registered family, built locally from configs (no downloads).

Sizes are odd and non-square (d_model 24, d_k 40, 3 heads of 8, 1 KV head) so shape and transpose bugs
fail loudly; the special token ids come from a small BPE tokenizer trained here on a fixed text.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

D_MODEL, D_K, N_HEADS, N_LAYERS = 24, 40, 3, 3

TEXT = """The Eiffel Tower is located in the city of Paris. The mother tongue of Danielle Darrieux is French.
Toko Yasuda plays the guitar. Autonomous University of Madrid is located in Spain. The capital of Italy is Rome.
Apple was founded by Steve Jobs. Michael Jordan plays basketball. The official language of Brazil is Portuguese.
Microsoft is headquartered in Redmond. Berlin is the capital of Germany. Tokyo is a city in Japan.
Lionel Messi plays football for Barcelona. The Louvre is a museum in Paris. London is the capital of England.
Mozart was born in Salzburg. Einstein developed the theory of relativity. The Nile flows through Egypt.
Therefore, because I think you should know, the answer is often simple. A quick brown fox jumps over a lazy dog.
"""

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT.splitlines() * 3, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return fast


def _text_kwargs(model_type: str, vocab: int, tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    ids = {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    llama_like = {
        "vocab_size": vocab,
        "hidden_size": D_MODEL,
        "intermediate_size": D_K,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": N_HEADS,
        "num_key_value_heads": 1,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        **ids,
    }
    gemma_like = {**llama_like, "head_dim": D_MODEL // N_HEADS}
    table: dict[str, dict[str, Any]] = {
        "gpt2": {
            "vocab_size": vocab,
            "n_embd": D_MODEL,
            "n_inner": D_K,
            "n_layer": N_LAYERS,
            "n_head": N_HEADS,
            "n_positions": 128,
            **ids,
        },
        "gptj": {
            "vocab_size": vocab,
            "n_embd": D_MODEL,
            "n_inner": D_K,
            "n_layer": N_LAYERS,
            "n_head": N_HEADS,
            "rotary_dim": 4,
            "n_positions": 128,
            **ids,
        },
        "gpt_neox": {
            "vocab_size": vocab,
            "hidden_size": D_MODEL,
            "intermediate_size": D_K,
            "num_hidden_layers": N_LAYERS,
            "num_attention_heads": N_HEADS,
            "max_position_embeddings": 128,
            "rotary_pct": 0.5,
            **ids,
        },
        "phi": {
            "vocab_size": vocab,
            "hidden_size": D_MODEL,
            "intermediate_size": D_K,
            "num_hidden_layers": N_LAYERS,
            "num_attention_heads": N_HEADS,
            "max_position_embeddings": 128,
            "partial_rotary_factor": 0.5,
            **ids,
        },
        "llama": llama_like,
        "mistral": llama_like,
        "qwen2": llama_like,
        "qwen3": {**llama_like, "head_dim": D_MODEL // N_HEADS},
        "phi3": {**llama_like, "pad_token_id": tok.pad_token_id},
        "gemma": gemma_like,
        "gemma2": {**gemma_like, "sliding_window": 4},
        "gemma3_text": {**gemma_like, "sliding_window": 4},
    }
    return table[model_type]


def tiny_config(model_type: str) -> Any:
    tok = tiny_tokenizer()
    vocab = len(tok)
    if model_type == "gemma3":
        text = {"model_type": "gemma3_text", **_text_kwargs("gemma3_text", vocab, tok)}
        vision = {
            "model_type": "siglip_vision_model",
            "hidden_size": 16,
            "intermediate_size": 20,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        }
        return AutoConfig.for_model(
            "gemma3",
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,
            image_token_index=vocab - 1,
            boi_token_index=vocab - 2,
            eoi_token_index=vocab - 3,
        )
    return AutoConfig.for_model(model_type, **_text_kwargs(model_type, vocab, tok))


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(model_type)
    if model_type == "gemma3":
        from transformers import Gemma3ForConditionalGeneration

        model = Gemma3ForConditionalGeneration(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    # Random RMSNorm gains of 0 (Gemma's 1 + w with w = 0 is fine) are kept; give the weights some spread.
    model.eval()
    model.requires_grad_(False)
    return model


FAMILIES = (
    "gpt2",
    "gptj",
    "gpt_neox",
    "phi",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma3",
)


@contextmanager
def head_input_contiguity(model: torch.nn.Module) -> Iterator[list[bool]]:
    """Whether each input the LM head receives inside the block is contiguous, in call order (a strided view of the
    hidden states sends the CPU's linear down a path 10-15x slower on a large vocabulary)."""
    seen: list[bool] = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _m, a: seen.append(a[0].is_contiguous()))
    try:
        yield seen
    finally:
        hook.remove()
