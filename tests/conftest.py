"""Fixtures: a tiny random Llama and a tiny byte-level tokenizer with a chat template.

Built from a config in a temporary folder, so tests download nothing. The folder is a normal
`save_pretrained` checkpoint, so it also exercises loading a model by local path.
"""

from __future__ import annotations

import os

import pytest
import torch

from dail.config import ModelConfig
from dail.models import load_model, load_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Solve the following problem. Reason step by step, and put the final answer in \\boxed{}.",
    "Problem: Tom has 3 apples and buys 4 more. How many apples does he have?",
    "An expert's solution, for your reference: 3+4=7. #### 7 The answer is 7.",
    "Key intermediate results, for your reference: 7; 12; 24",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) { } \\boxed{7} x y z the a an of to and is",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    # Larger-than-default init so the random model has peaked, varied distributions.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny model + tokenizer folder (load it with ModelConfig(name=str(folder)))."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    model = make_model(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny(tiny_dir):
    """(model, tokenizer) loaded through dail.models from the saved folder."""
    cfg = ModelConfig(name=str(tiny_dir), device="cpu")
    return load_model(cfg), load_tokenizer(cfg)


@pytest.fixture(scope="session")
def tiny_tok():
    return make_tokenizer()


def kill_midway(cmd: list[str], output, lines: int, timeout: float = 120.0) -> tuple[int, int]:
    """Start `cmd`, SIGKILL it once `output` holds at least `lines` lines, and return how many
    lines the dead process left and its pid (the crash tests then rerun `cmd` and check nothing is lost
    or doubled)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and (not output.exists() or output.read_text().count("\n") < lines):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return output.read_text().count("\n"), proc.pid

