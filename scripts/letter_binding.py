"""Can a model bind a letter to the line it labels? The skill every ALRO ranking rests on.

ALRO's ranker answers with candidate letters (" B A C ..."), so it must know which letter labels
which line. This probe asks plain multiple-choice questions about synthetic movies ("(A) title:
... genres: Western / (B) ... / Which movie is a Western? Answer:") and reads the model's
distribution over " A", " B", ... at the answer: accuracy near chance means the model cannot yet
bind letters, and fine-tuning has to teach that before it can learn anyone's taste.

  python scripts/letter_binding.py                            # the base model (smollm2-135m)
  python scripts/letter_binding.py --checkpoint runs/x/final  # a trained ranker's adapter
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch

from alro_ray.config import load_config
from alro_ray.model.loading import load_base_model, load_tokenizer
from alro_ray.data.prompts import LETTERS
from alro_ray.data.synthetic import GENRES, unique_titles


def questions(n: int, choices: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    titles = unique_titles(np.random.default_rng(seed), 400)
    out = []
    for _ in range(n):
        genres = rng.sample(GENRES, choices)
        lines = "".join(f"({LETTERS[j]}) title: {rng.choice(titles)} genres: {g}\n" for j, g in enumerate(genres))
        answer = rng.randrange(choices)
        out.append((f"{lines}Which movie is a {genres[answer]}? Answer:", answer))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="base model: alias, local path or hub name")
    p.add_argument("--checkpoint", help="a ranker directory (OUTPUT/final): probe its adapter instead")
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if args.checkpoint:
        from alro_ray.rank.ranker import load_ranker

        ranker = load_ranker(args.checkpoint)
        model, tok, name = ranker.model, ranker.tokenizer, f"ranker {args.checkpoint}"
    else:
        cfg = load_config(None, [f"model.name={args.model}"])
        model, tok, name = load_base_model(cfg.model), load_tokenizer(args.model), args.model
    model.eval()
    letters = [tok.encode(f" {LETTERS[j]}", add_special_tokens=False)[0] for j in range(args.choices)]
    correct, mass, first = 0, 0.0, [0] * args.choices
    with torch.no_grad():
        for text, answer in questions(args.questions, args.choices, args.seed):
            ids = tok(text, return_tensors="pt").input_ids
            probs = model(input_ids=ids).logits[0, -1].softmax(-1)[letters]
            pick = int(probs.argmax())
            correct += pick == answer
            mass += float(probs.sum())
            first[pick] += 1
    n = args.questions
    print("| model | questions | accuracy | chance | P(a letter) | picks per letter |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {name} | {n} | {correct / n:.3f} | {1 / args.choices:.3f} | {mass / n:.3f} | "
          + " ".join(f"{LETTERS[j]}:{c}" for j, c in enumerate(first)) + " |")


if __name__ == "__main__":
    main()
