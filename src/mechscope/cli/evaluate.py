"""``mechscope eval ...``: an intervention's target effect and side effects, as a table and a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.cli.common import fail
from mechscope.cli.verb import run_verb

eval_app = typer.Typer(help="Evaluate an intervention on its target and its side effects.", no_args_is_help=True)

TASK_NAMES = ("refusal", "chat-refusal", "sentiment", "facts", "truth", "ioi", "backdoor")
TASK_HELP = (
    f"Target task: {', '.join(TASK_NAMES)}; a .jsonl/.tsv file of prompts with expected completions "
    "({'prompt', 'answer'[, 'wrong', 'role': 'target'|'side']} per line); or PATH.py:NAME / module:NAME "
    "naming a mechscope.improve.Task."
)


@eval_app.command("run")
def run_cmd(
    model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
    task: Annotated[str, typer.Option(help=TASK_HELP)],
    vector: Annotated[Path | None, typer.Option(help="Steering vector file to apply.")] = None,
    coefficient: Annotated[float, typer.Option(help="Steering coefficient.")] = 1.0,
    positions: Annotated[str, typer.Option(help="Steering positions: all, prompt or generated.")] = "all",
    direction: Annotated[Path | None, typer.Option(help="Direction file to ablate at every layer.")] = None,
    orthogonalized: Annotated[
        bool, typer.Option("--orthogonalized", help="Use weight orthogonalisation instead of hooks.")
    ] = False,
    modified: Annotated[Path | None, typer.Option(help="A modified model folder to compare with MODEL.")] = None,
    edit: Annotated[Path | None, typer.Option(help="An edit record (mechscope edit --record) to apply.")] = None,
    side_tasks: Annotated[
        str, typer.Option(help="Comma-separated planted tasks for side effects ('none'; default: all others).")
    ] = "",
    side: Annotated[
        list[str], typer.Option(help="Extra side-effect task (repeatable; same forms as --task): must not change.")
    ] = [],  # noqa: B006
    chat: Annotated[
        bool, typer.Option("--chat/--no-chat", help="Render completion-file prompts as chat turns (instruct models).")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens of each sample continuation.")] = 12,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Result .safetensors file (default: under ./mechscope-out).")
    ] = None,
    figure: Annotated[Path | None, typer.Option(help="Also write the figure as HTML (plotly.js shared).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the task splits.")] = 0,
) -> None:
    """Evaluate one intervention (steering vector, directional ablation, edit, or a modified model)."""
    from mechscope.cli.common import load_model
    from mechscope.errors import ConfigError
    from mechscope.improve import EvaluationConfig, evaluate
    from mechscope.improve.task_specs import load_task
    from mechscope.steer import Direction, SteeringVector, directional_ablation, orthogonalize, steer

    def intervention_for(hm: Any) -> Any:
        if vector is not None:
            return steer(hm, SteeringVector.load(vector, hm), coefficient, positions=positions)  # type: ignore[arg-type]
        if direction is not None:
            d = Direction.load(direction, hm)
            return orthogonalize(hm, d) if orthogonalized else directional_ablation(hm, d)
        if edit is not None:
            from mechscope.improve.edit_task import AppliedEdit
            from mechscope.steer.editing.records import EditRecord

            return AppliedEdit(EditRecord.load(edit), hm)
        assert modified is not None
        return load_model(modified)

    def call(hm: Any) -> Any:
        target = load_task(task, model=hm, seed=seed, chat=chat)
        extra = tuple(load_task(spec, model=hm, seed=seed, chat=chat) for spec in side)
        sides = () if side_tasks == "none" else (tuple(t for t in side_tasks.split(",") if t.strip()) or None)
        config = EvaluationConfig(side_tasks=sides, side_effect_tasks=extra, seed=seed, max_new_tokens=max_new_tokens)
        return evaluate(hm, intervention_for(hm), target, config)

    def summary(result: Any, hm: Any) -> list[str]:
        return [f"{result.config['task']}: {result.config['intervention']}", result.table(), "", result.samples_table()]

    if len([x for x in (vector, direction, modified, edit) if x is not None]) != 1:
        raise fail(ConfigError("give exactly one of --vector, --direction, --edit or --modified"))
    run_verb(model, call, out=out, default_name="evaluation.safetensors", html=figure, summary=summary)


@eval_app.command("show")
def show_cmd(
    result: Annotated[Path, typer.Argument(help="A result file written by `mechscope eval run`.")],
) -> None:
    """Print a saved evaluation as tables."""
    from mechscope.errors import MechscopeError
    from mechscope.improve import EvaluationResult

    try:
        loaded = EvaluationResult.load(result)
    except MechscopeError as exc:
        raise fail(exc) from exc
    typer.echo(f"{loaded.config['task']}: {loaded.config['intervention']}")
    typer.echo(loaded.table())
    typer.echo("")
    typer.echo(loaded.samples_table())


__all__ = ["eval_app"]
