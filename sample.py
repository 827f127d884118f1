"""Generate text from a checkpoint (ours or a Hugging Face GPT-2 folder).

    python sample.py out/shakespeare_cpu/ckpt.pt --prompt "ROMEO:" --max_new_tokens 100
    python sample.py out/gpt2_owt/ckpt.pt --prompt "Hello, I'm a language model," --num_samples 3 --top_k 50
"""

from __future__ import annotations

import torch

from checkpoint import load_model
from errors import ArgumentParser, UserError, run_main
from tokenizer import EOT, get_tokenizer


def sample(ckpt: str, prompt: str, num_samples: int = 1, max_new_tokens: int = 100, temperature: float = 0.8,
           top_k: int | None = 200, seed: int = 1337, device: str = "auto") -> list[str]:
    """Continuations of `prompt` (prompt included), one string per sample."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model = load_model(ckpt).to(dev).eval()
    enc = get_tokenizer()
    ids = enc.encode_ordinary(prompt) if prompt else [EOT]
    if len(ids) >= model.config.block_size:
        raise UserError(f"the prompt is {len(ids)} tokens; the model's context is {model.config.block_size}")
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    out = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return [enc.decode([t for t in row.tolist() if t != EOT or not prompt]) for row in out]


def main() -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="out/<run>/ckpt.pt, or a Hugging Face GPT-2 folder")
    p.add_argument("--prompt", default="", help="text to continue (default: start from <|endoftext|>)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="<= 0: greedy")
    p.add_argument("--top_k", type=int, default=200, help="0: no top-k cut")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    texts = sample(a.ckpt, a.prompt, a.num_samples, a.max_new_tokens, a.temperature, a.top_k or None, a.seed, a.device)
    for i, t in enumerate(texts):
        if a.num_samples > 1:
            print(f"--- sample {i}")
        print(t)


if __name__ == "__main__":
    run_main(main)
