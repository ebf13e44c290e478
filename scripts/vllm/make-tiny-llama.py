#!/usr/bin/env python3
"""Builds a tiny Llama with random weights and a locally trained tokenizer.

Needs no model hub: the tokenizer is a byte-level BPE trained on generated
text, the model a 2-layer Llama with a 64-wide hidden state (vLLM's CPU
attention wants a common head size: 64, one head). It answers with random
tokens, fast on CPU, and vLLM serves it like any Llama: chat template,
prefix caching, metrics, usage.

Usage: make-tiny-llama.py OUT_DIR   (torch, transformers and tokenizers come with vLLM)
"""
import random
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


def corpus(rng):
    common = (
        "the a of to in is it that for on with as at by this from or one all when we can "
        "your which said if do will each about how up out then many some so would other "
        "into more two like time no make than first been who now people over down only "
        "way use may long very after words just where most know hello world request model "
        "token cache proxy replica prefix routing engine stream answer question"
    ).split()
    syllables = "ba be bi bo ka ke ki ko la le li lo ma me mi mo na ne ni no ra re ri ro ta te ti to".split()
    words = common + [
        "".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(3000)
    ]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(5000)]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    rng = random.Random(0)
    torch.manual_seed(0)

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(rng), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.model_max_length = 2048
    hf.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(hf),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        pad_token_id=hf.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    print(f"{out}: vocabulary {len(hf)}, {sum(p.numel() for p in model.parameters())} parameters")


if __name__ == "__main__":
    main()
