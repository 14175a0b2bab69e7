"""A last-token intervention on prompts of different lengths, on SmolLM2-135M-Instruct (its tokenizer pads on
the right): the evaluation harness's side-effect KL on its neutral texts, against each text run alone.

Before positions counted each row's own tokens, ``positions=[-1]`` on the harness's right-padded neutral
batch steered padding in every text but the longest (docs/steer.md). Run it with the code to compare on
``PYTHONPATH`` (a worktree of an older commit gives the old figure).

Needs the real models: scripts/install_real_models.sh.

    .venv/bin/python scripts/measure_padded_positions.py [--coefficient 8] [--layer 15]
"""

from __future__ import annotations

import argparse

import torch

import mechscope as ms
from mechscope.data.contrasts import contrast_texts
from mechscope.improve import harness
from mechscope.improve.neutral import NEUTRAL_TEXTS
from mechscope.metrics import kl_div
from mechscope.steer import mean_difference, steer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coefficient", type=float, default=8.0)
    parser.add_argument("--layer", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = ms.load_model("smollm2-135m-instruct")
    positive, negative = contrast_texts("sentiment", n=16)
    vector = mean_difference(model, positive, negative, layers=args.layer)
    texts = list(NEUTRAL_TEXTS)
    lengths = sorted(model.to_tokens(t)["input_ids"].shape[1] for t in texts)
    side = model.tokenizer.padding_side
    print(f"{len(texts)} neutral texts of {lengths[0]}..{lengths[-1]} tokens; padding side {side}")
    intervention = steer(model, vector, args.coefficient, positions=[-1])
    before = harness._neutral_logprobs(model, texts)
    with intervention:
        after = harness._neutral_logprobs(model, texts)
    if isinstance(before, tuple):  # code before 2026-12-08: one right-padded batch and its mask
        reported = float(kl_div(after[0], before[0], attention_mask=before[1], reduction="mean"))
    else:
        reported = harness._neutral_kl(before, after)
    alone = []
    with torch.no_grad():
        for text in texts:
            plain = model.forward(text).float()
            with intervention:
                steered = model.forward(text).float()
            alone.append(kl_div(steered, plain, reduction="none")[0])
    print(f"kl_neutral as the harness reports it: {reported:.4f}")
    print(f"kl_neutral with each text run alone:  {float(torch.cat(alone).mean()):.4f}")


if __name__ == "__main__":
    main()
