"""``mechscope locate probe``: per-layer probes on labelled prompts (a JSONL file or a zoo task)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.cli.common import Quiet
from mechscope.cli.verb import config_options, run_verb
from mechscope.io import read_jsonl
from mechscope.locate.probes import ProbeConfig


def _zoo_task(task: str, seed: int) -> tuple[list[str], list[str], list[str], list[str]]:
    """(train prompts, train labels, test prompts, test labels) of a zoo task with binary labels."""
    from mechscope.data.tasks import sentiment, truth

    if task == "truth":
        data = truth.generate(seed)
        train, test = truth.judged_claims(data.train), data.eval["heldout_entities"]
    elif task == "sentiment":
        data = sentiment.generate(seed)
        train, test = data.train, next(iter(data.eval.values()))
    else:
        raise typer.BadParameter(f"--task must be 'truth' or 'sentiment'; got {task!r}")
    return (
        [e.prompt for e in train],
        [e.label for e in train],
        [e.prompt for e in test],
        [e.label for e in test],
    )


def _jsonl(path: Path) -> tuple[list[str], list[Any]]:
    texts, labels = [], []
    for number, row in read_jsonl(path, "probe data file ({'text': ..., 'label': ...} per line)"):
        if "text" not in row or "label" not in row:
            raise typer.BadParameter(f"{path}:{number}: each line needs 'text' and 'label'; got keys {sorted(row)}")
        texts.append(row["text"])
        labels.append(row["label"])
    return texts, labels


def register(app: typer.Typer) -> None:
    @app.command("probe")
    @config_options(ProbeConfig)
    def probe_cmd(
        model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
        data: Annotated[
            Path | None, typer.Option(help="JSONL with {'text', 'label'} per line (binary labels).")
        ] = None,
        task: Annotated[str | None, typer.Option(help="Zoo task instead of --data: 'truth' or 'sentiment'.")] = None,
        test_data: Annotated[Path | None, typer.Option(help="JSONL test set (default: a random split).")] = None,
        site_kind: Annotated[str, typer.Option(help="Site kind read at every layer.")] = "hook_resid_post",
        position: Annotated[int | None, typer.Option(help="Token position (default: each row's last token).")] = None,
        *,
        config: ProbeConfig,
        max_examples: Annotated[int, typer.Option(help="Cap on training examples (random subset).")] = 2000,
        positive: Annotated[str | None, typer.Option(help="Label of class 1 (default: the larger label).")] = None,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Result file (default: ./mechscope-out).")] = None,
        html: Annotated[Path | None, typer.Option(help="Also write an HTML figure of test accuracy.")] = None,
        batch_size: Annotated[int, typer.Option(help="Prompts per forward pass (lower it when memory runs out).")] = 32,
        quiet: Quiet = False,
    ) -> None:
        """Train a probe per layer; print held-out, cross-validated and control accuracy, selectivity."""
        import random

        from mechscope.cli.memory import check_batch_size, memory_knob
        from mechscope.locate.probes import train_probes

        if (data is None) == (task is None):
            raise typer.BadParameter("give exactly one of --data or --task")
        check_batch_size(batch_size)
        seed = config.seed
        test_texts: list[str] | None = None
        test_labels: list[Any] | None = None
        if task is not None:
            texts, labels, test_texts, test_labels = _zoo_task(task, seed)
        else:
            assert data is not None
            texts, labels = _jsonl(data)
            if test_data is not None:
                test_texts, test_labels = _jsonl(test_data)
        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        order = order[:max_examples]
        texts, labels = [texts[i] for i in order], [labels[i] for i in order]

        def call(hm: Any) -> Any:
            with memory_knob("--batch-size", batch_size):
                return train_probes(
                    hm,
                    texts,
                    labels,
                    kind=site_kind,
                    position=position,
                    test_inputs=test_texts,
                    test_labels=test_labels,
                    positive_label=positive,
                    config=config,
                    progress=not quiet,
                    batch_size=batch_size,
                )

        def summary(result: Any, hm: Any) -> Iterator[str]:
            cols = [
                c
                for c in ("train_accuracy", "test_accuracy", "cv_accuracy", "control_accuracy", "selectivity")
                if c in result.tensors
            ]
            yield f"{'site':28s} " + " ".join(f"{c.replace('_accuracy', ''):>9s}" for c in cols)
            for i, label in enumerate(result.labels["layer"]):
                yield f"{label:28s} " + " ".join(f"{float(result[c][i]):9.3f}" for c in cols)
            yield f"best layer {result.config['layers'][result.best_layer()]}"

        run_verb(model, call, out=out, default_name="probes.safetensors", html=html, summary=summary)
