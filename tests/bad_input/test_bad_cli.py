"""Bad input on the command line, one or more cases per command group: exit code 2, no traceback, one message that
names what was expected and what came, and the model folders byte-identical afterwards."""

from __future__ import annotations

import json

import pytest
import torch
from bad_cases import check_cli

from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def where(tmp_path_factory):
    """Two tiny model folders, a steering vector made on the llama one, and good and bad input files."""
    from mechscope.model.loading import load_model
    from mechscope.results import Artifact
    from mechscope.steer.vectors import SteeringVector

    t = tmp_path_factory.mktemp("cli")
    for family in ("gpt2", "llama"):
        hf, tok = tiny_model(family)
        hf.save_pretrained(t / family)
        tok.save_pretrained(t / family)
    llama = load_model(t / "llama")
    SteeringVector(torch.ones(2, 32), [0, 1], **Artifact.model_info(llama)).save(t / "llama_vec.safetensors")
    SteeringVector(torch.zeros(2, 32), [0, 1], **Artifact.model_info(llama)).save(t / "zero_vec.safetensors")
    files = {
        "empty.txt": b"",
        "blank.txt": b"\n\n  \n",
        "latin.txt": b"caf\xe9 au lait\n",
        "pos.txt": b"good great\nlovely fine\n",
        "neg.txt": b"bad awful\nterrible poor\n",
        "bad.jsonl": b'{"text": "a", "label": 0}\n{oops\n',
        "latin.jsonl": b'{"text": "caf\xe9", "label": 1}\n',
        "onecls.jsonl": "\n".join(json.dumps({"text": f"a {i}", "label": 1}) for i in range(6)).encode(),
        "nolabel.jsonl": "\n".join(json.dumps({"text": f"a {i}"}) for i in range(6)).encode(),
        "bad.json": b"[{oops",
        "notlist.json": b'{"prompt": "{} is"}',
        "conflict.json": json.dumps(
            [
                {"prompt": "{} lives in", "subject": "the cat", "target": " Rome"},
                {"prompt": "{} lives in", "subject": "the cat", "target": " Paris"},
            ]
        ).encode(),
        "notst.safetensors": b"hello",
    }
    for name, data in files.items():
        (t / name).write_bytes(data)
    return t


def args_of(template: list[str], t) -> list[str]:
    return [a.format(t=t, m=t / "gpt2", l=t / "llama") for a in template]


CASES = [
    # top-level commands
    (["info", "{t}/absent"], ["no model folder at", "absent", "bundled:"]),
    (["info", "no-such-model"], ["'no-such-model'", "smollm2-135m-instruct"]),
    (["info", "{t}/pos.txt"], ["is a file", "expected a folder holding config.json"]),
    (["cache", "{m}", "-p", "a", "-s", "blocks.9.hook_resid_post"], ["past the last layer", "0..1"]),
    (["cache", "{m}", "-p", "a", "-s", "blocks.0.hook_nope"], ["'blocks.0.hook_nope'", "Did you mean"]),
    (["cache", "{m}", "-p", "a", "--positions", "x"], ["--positions must be comma-separated integers", "'x'"]),
    (["cache", "{m}", "-p", "a b", "--positions", "40"], ["positions [40]", "[-4, 4)"]),
    (["cache", "{m}", "--prompts-file", "{t}/empty.txt"], ["give prompts", "--prompts-file"]),
    (["cache", "{m}", "--prompts-file", "{t}/latin.txt"], ["latin.txt", "not UTF-8", "byte 3"]),
    (["cache", "{m}", "--prompts-file", "{t}/absent.txt"], ["no prompt list file", "absent.txt"]),
    (["cache", "{m}", "-p", "the " * 80], ["prompt of 83 tokens", "context of 64 positions"]),
    (["cache", "{m}", "-p", "a", "--batch-size", "0"], ["--batch-size", "got 0"]),
    (["diff", "{m}", "{t}/absent"], ["no model folder at", "absent"]),
    (["diff", "{m}", "{l}"], ["same architecture", "'gpt2' vs 'llama'"]),
    (["demo", "--section", "nope", "--out", "{t}/demo"], ["unknown demo sections ['nope']", "induction"]),
    (["serve", "--port", "-5", "--runs", "{t}/runs"], ["port must be an int in 0..65535", "-5"]),
    (["clean", "{t}/absent"], ["expected a folder", "absent"]),
    (["clean", "{t}", "--grace", "-1"], ["--grace", ">= 0", "-1"]),
    # locate
    (["locate", "logit-lens", "{m}"], ["give at least one --prompt or a --prompt-file"]),
    (["locate", "logit-lens", "{m}", "--prompt-file", "{t}/latin.txt"], ["latin.txt", "not UTF-8"]),
    (["locate", "logit-lens", "{m}", "--prompt-file", "{t}/absent.txt"], ["absent.txt"]),
    (["locate", "logit-lens", "{m}", "--prompt-file", "{t}/blank.txt"], ["give at least one --prompt"]),
    (["locate", "logit-lens", "{m}", "-p", "a", "--top", "0"], ["--top must be a positive", "got 0"]),
    (["locate", "logit-lens", "{m}", "-p", "a", "--batch-size", "-1"], ["--batch-size", "got -1"]),
    (["locate", "probe", "{m}", "--data", "{t}/onecls.jsonl"], ["exactly 2 values", "got [1]"]),
    (["locate", "probe", "{m}", "--data", "{t}/nolabel.jsonl"], ["nolabel.jsonl:1", "'text' and", "'label'"]),
    (["locate", "probe", "{m}", "--data", "{t}/bad.jsonl"], ["bad.jsonl', line 2: malformed JSON"]),
    (["locate", "probe", "{m}", "--data", "{t}/latin.jsonl"], ["latin.jsonl", "not UTF-8"]),
    (["locate", "probe", "{m}", "--data", "{t}/empty.txt"], ["empty.txt", "holds no lines"]),
    (["locate", "probe", "{m}", "--task", "nope"], ["--task must be 'truth' or 'sentiment'", "'nope'"]),
    (["locate", "probe", "{m}", "--data", "{t}/onecls.jsonl", "--kind", "svm"], ["'logistic'", "'svm'"]),
    (
        ["locate", "patch", "{m}", "-c", "the dog", "-x", "the dog sat", "-a", " the", "-w", " a"],
        ["same [batch, pos] token shape", "clean (1, 4) and corrupt (1, 6)"],
    ),
    (
        ["locate", "patch", "{m}", "-c", "the dog", "-x", "a cat", "-a", "the cat", "-w", " a"],
        ["'the cat' to be a single token", "4 tokens"],
    ),
    (
        ["locate", "patch", "{m}", "-c", "the dog", "-x", "a cat", "-a", " the", "-w", " a", "--kind", "nope"],
        ["cannot sweep site kind 'nope'", "expected one of"],
    ),
    (["locate", "heads", "{m}", "--n-sequences", "0"], ["n_sequences must be >= 1", "got 0"]),
    (["locate", "trace", "{m}", "-p", "the dog sat", "-s", "cat"], ["'cat'", "not found in 'the dog sat'"]),
    (["locate", "trace", "{m}", "-p", "the dog sat", "-s", "dog", "--noise", "nan"], ["noise must be > 0", "nan"]),
    (["locate", "dla", "{m}", "-p", "the dog", "--answer", " the", "--by", "block"], ["'layer', 'head'", "'block'"]),
    (["locate", "dla", "{m}", "-p", "the dog"], ["give --answer TOKEN"]),
    (["locate", "tuned-lens", "{m}", "--lens", "{t}/notst.safetensors", "-p", "a"], ["not a readable", "tuned lens"]),
    (["locate", "tuned-lens", "{m}", "--lens", "{t}/absent.safetensors", "-p", "a"], ["no tuned lens file", "absent"]),
    (["locate", "ig", "{m}", "-p", "the dog", "--answer", " the", "--steps", "0"], ["steps must be >= 1", "got 0"]),
    # steer
    (
        ["steer", "vector", "{m}", "--positive", "{t}/empty.txt", "--negative", "{t}/neg.txt"],
        ["empty.txt", "no non-empty"],
    ),
    (
        ["steer", "vector", "{m}", "--positive", "{t}/latin.txt", "--negative", "{t}/neg.txt"],
        ["latin.txt", "not UTF-8"],
    ),
    (
        ["steer", "vector", "{m}", "--positive", "{t}/pos.txt", "--negative", "{t}/neg.txt", "--layers", "7"],
        ["layers [7] do not exist", "0..1"],
    ),
    (["steer", "vector", "{m}", "--contrast", "nope"], ["unknown contrast 'nope'", "'sentiment'"]),
    (["steer", "generate", "{m}", "--vector", "{t}/llama_vec.safetensors", "-p", "a"], ["(llama)", "(gpt2)"]),
    (
        ["steer", "generate", "{m}", "--vector", "{t}/notst.safetensors", "-p", "a"],
        ["notst.safetensors", "not a readable"],
    ),
    (["steer", "generate", "{l}", "--vector", "{t}/zero_vec.safetensors", "-p", "a"], ["zero vector", "[0, 1]"]),
    (
        ["steer", "generate", "{l}", "--vector", "{t}/llama_vec.safetensors", "-p", "a", "--coefficient", "nan"],
        ["coefficient must be a finite number", "nan"],
    ),
    (
        ["steer", "generate", "{l}", "--vector", "{t}/llama_vec.safetensors", "-p", "a", "--max-new-tokens", "0"],
        ["max_new_tokens must be a positive integer", "0"],
    ),
    (
        ["steer", "generate", "{l}", "--vector", "{t}/llama_vec.safetensors", "-p", "a", "--positions", "first"],
        ["comma-separated integers", "'first'"],
    ),
    (["steer", "ablate", "{m}", "-s", "blocks.0.attn.hook_z", "-p", "a", "--heads", "9"], ["heads [9]", "4 entries"]),
    (
        ["steer", "ablate", "{m}", "-s", "blocks.0.mlp.hook_post", "-p", "a", "--neurons", "500"],
        ["neurons [500]", "128 entries"],
    ),
    (["steer", "ablate", "{m}", "-s", "blocks.0.hook_resid_post", "-p", "a", "--method", "nope"], ["'zero'", "'nope'"]),
    (
        ["steer", "ablate", "{m}", "-s", "blocks.0.hook_resid_post", "-p", "a", "--method", "scale", "--factor", "inf"],
        ["factor must be a finite number", "inf"],
    ),
    (
        ["steer", "orthogonalize", "{m}", "--direction", "{t}/absent.safetensors", "-o", "{t}/orth"],
        ["no artifact file"],
    ),
    # features
    (["features", "eval", "{m}", "{t}/notst.safetensors"], ["not a readable safetensors file", "sparse autoencoder"]),
    (["features", "eval", "{m}", "{t}/absent.safetensors"], ["no sparse autoencoder file", "absent"]),
    (["features", "train", "{m}", "--site", "blocks.0.hook_nope", "-o", "{t}/s.st"], ["'blocks.0.hook_nope'"]),
    (
        ["features", "train", "{m}", "--site", "blocks.0.hook_resid_post", "--lr", "nan", "-o", "{t}/s.st"],
        ["finite lr > 0", "lr=nan"],
    ),
    (
        ["features", "train", "{m}", "--site", "blocks.0.hook_resid_post", "--max-tokens", "0", "-o", "{t}/s.st"],
        ["max_tokens must be >= 1", "got 0"],
    ),
    # edit
    (
        [
            "edit",
            "rome",
            "{m}",
            "--prompt",
            "{{}} lives in",
            "--subject",
            "the cat",
            "--target",
            " Rome",
            "--layer",
            "5",
        ],
        ["ROMEConfig.layer=5", "layers 0..1"],
    ),
    (
        ["edit", "rome", "{m}", "--prompt", "{{}} lives in", "--subject", "", "--target", " Rome"],
        ["non-empty subject", "got ''"],
    ),
    (["edit", "memit", "{m}", "--requests", "{t}/bad.json"], ["bad.json", "line 1 column 3"]),
    (["edit", "memit", "{m}", "--requests", "{t}/notlist.json"], ["must hold a JSON list of requests", "got dict"]),
    (["edit", "memit", "{m}", "--requests", "{t}/conflict.json", "-l", "0"], ["requests 0 and 1", "' Paris'"]),
    (["edit", "memit", "{m}", "--requests", "{t}/absent.json"], ["absent.json", "No such file"]),
    (["edit", "memit", "{m}", "--requests", "{t}/conflict.json", "--lr", "nan"], ["lr must be a finite number > 0"]),
    (["edit", "stats", "{m}", "-l", "7"], ["layer 7 does not exist", "0..1"]),
    (["edit", "stats", "{m}", "-l", "0", "--n-tokens", "0"], ["n_tokens must be a positive integer", "got 0"]),
    (["edit", "revert", "{m}", "{t}/absent.safetensors", "--out", "{t}/rev"], ["no edit record file", "absent"]),
    # eval, runs, detect, monitor
    (["eval", "run", "{m}", "--task", "nope"], ["give exactly one of --vector, --direction, --edit or --modified"]),
    (["runs", "show", "nope", "--runs", "{t}/runs"], ["no run 'nope'", "runs"]),
    (
        [
            "detect",
            "train",
            "{m}",
            "--site",
            "blocks.0.hook_resid_post",
            "--positive",
            "{t}/latin.txt",
            "--negative",
            "{t}/neg.txt",
        ],
        ["latin.txt", "not UTF-8"],
    ),
    (
        [
            "detect",
            "train",
            "{m}",
            "--site",
            "blocks.0.hook_resid_post",
            "--positive",
            "{t}/absent.txt",
            "--negative",
            "{t}/neg.txt",
        ],
        ["no example file", "absent.txt"],
    ),
    (["detect", "train", "{m}", "--site", "blocks.0.hook_resid_post", "--data", "nope"], ["'nope'"]),
]


@pytest.mark.parametrize("template,needles", CASES, ids=[f"{i:02d}-" + "-".join(c[0][:2]) for i, c in enumerate(CASES)])
def test_bad_command_lines(template, needles, where):
    check_cli(args_of(template, where), needles, folders=[where / "gpt2", where / "llama"])
