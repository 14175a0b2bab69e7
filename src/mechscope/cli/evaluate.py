"""``mechscope eval ...``: an intervention's target effect and side effects, as a table and a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.cli.common import fail, offline_by_default

eval_app = typer.Typer(help="Evaluate an intervention on its target and its side effects.", no_args_is_help=True)

TASK_NAMES = ("refusal", "sentiment")


@eval_app.command("run")
def run_cmd(
    model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
    task: Annotated[str, typer.Option(help=f"Target task: {', '.join(TASK_NAMES)}.")],
    vector: Annotated[Path | None, typer.Option(help="Steering vector file to apply.")] = None,
    coefficient: Annotated[float, typer.Option(help="Steering coefficient.")] = 1.0,
    positions: Annotated[str, typer.Option(help="Steering positions: all, prompt or generated.")] = "all",
    direction: Annotated[Path | None, typer.Option(help="Direction file to ablate at every layer.")] = None,
    orthogonalized: Annotated[
        bool, typer.Option("--orthogonalized", help="Use weight orthogonalisation instead of hooks.")
    ] = False,
    modified: Annotated[Path | None, typer.Option(help="A modified model folder to compare with MODEL.")] = None,
    side_tasks: Annotated[
        str, typer.Option(help="Comma-separated planted tasks for side effects ('none'; default: all others).")
    ] = "",
    out: Annotated[Path, typer.Option("--out", "-o", help="Result .safetensors file.")] = Path(
        "evaluation.safetensors"
    ),
    figure: Annotated[Path | None, typer.Option(help="Also write the figure as a self-contained HTML file.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the task splits.")] = 0,
) -> None:
    """Evaluate one intervention (steering vector, directional ablation, or a modified model)."""
    offline_by_default()
    from mechscope.errors import ConfigError, MechscopeError
    from mechscope.improve import EvaluationConfig, RefusalTask, SentimentTask, evaluate
    from mechscope.model.loading import load_model
    from mechscope.steer import Direction, SteeringVector, directional_ablation, orthogonalize, steer

    try:
        hm = load_model(model)
        chosen = [x for x in (vector, direction, modified) if x is not None]
        if len(chosen) != 1:
            raise ConfigError("give exactly one of --vector, --direction or --modified")
        intervention: Any
        if vector is not None:
            intervention = steer(hm, SteeringVector.load(vector, hm), coefficient, positions=positions)  # type: ignore[arg-type]
        elif direction is not None:
            d = Direction.load(direction, hm)
            intervention = orthogonalize(hm, d) if orthogonalized else directional_ablation(hm, d)
        else:
            assert modified is not None
            intervention = load_model(modified)
        if task == "refusal":
            target: Any = RefusalTask(seed=seed)
        elif task == "sentiment":
            target = SentimentTask(seed=seed)
        else:
            raise ConfigError(f"unknown task {task!r}; known: {list(TASK_NAMES)}")
        if side_tasks == "none":
            sides: tuple[str, ...] | None = ()
        else:
            sides = tuple(t for t in side_tasks.split(",") if t.strip()) or None
        result = evaluate(hm, intervention, target, EvaluationConfig(side_tasks=sides, seed=seed))
        path = result.save(out)
        if figure is not None:
            figure.parent.mkdir(parents=True, exist_ok=True)
            result.plot().write_html(str(figure), include_plotlyjs=True)
    except MechscopeError as exc:
        raise fail(exc) from exc
    typer.echo(f"{result.config['task']}: {result.config['intervention']}")
    typer.echo(result.table())
    typer.echo("")
    typer.echo(result.samples_table())
    typer.echo(f"result -> {path}" + (f", figure -> {figure}" if figure is not None else ""))


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
