"""``mechscope edit``: ROME and MEMIT edits, their exact revert, and the key statistics they need.

Edits run on a model folder (or bundled name) and write the edited model with ``--save-model`` and the
edit record with ``--record``; ``revert`` restores the original weights bit for bit from the record.

Every edit is measured through the evaluation harness (:func:`mechscope.improve.evaluate` with an
:class:`~mechscope.improve.edit_task.EditTask`): efficacy and paraphrases as targets; as side effects
the neutral-text KL and perplexity *and* neighbourhood checks -- the edited relation asked about other
subjects of the same kind (built automatically, or ``--neighbour SUBJECT``), answered by the unedited
model: ``neighbourhood_to_target`` is the share of them the edit turned into its target. Key statistics
come from ``--text-file`` when given, else from the model's default text (English on a real model).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.cli.common import fail, offline_by_default
from mechscope.cli.verb import config_options
from mechscope.steer.editing.memit import MEMITConfig
from mechscope.steer.editing.rome import ROMEConfig

edit_app = typer.Typer(help="Knowledge editing (ROME, MEMIT) with exact revert.", no_args_is_help=True)

TEXT_HELP = "Text for the key statistics, one document per line (default: the model's default text)."
NEIGHBOUR_HELP = (
    "Other subject to ask the edited relation about (repeatable; default: subjects of the edited subject's kind)."
)
KIND_HELP = "Kind of the automatic neighbour subjects: country, city, person, company, language (default: guessed)."


def _save_model(hm: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    hm.hf_model.save_pretrained(folder)
    if hm.tokenizer is not None:
        hm.tokenizer.save_pretrained(folder)


def _neighbourhood(subjects: list[str], n: int, kind: str | None) -> Any:
    from mechscope.steer.editing.neighbourhood import NeighbourhoodConfig

    return NeighbourhoodConfig(n=n, subjects=tuple(subjects), kind=kind or None)


def _user_texts(text_file: Path | None) -> tuple[list[str] | None, str | None]:
    """(texts, stream label) of a text file, one document per line; (None, None) for the model's default text."""
    if text_file is None:
        return None, None
    from mechscope.data.files import read_prompts

    label = "file-" + "".join(c if c.isalnum() else "_" for c in text_file.stem)[:40]
    return read_prompts(text_file), label


def _evaluate_edit(hm: Any, record: Any, neighbourhood: Any) -> tuple[Any, Any]:
    """(result, task): the edit through the harness, reverted for "before", applied for "after", left applied."""
    from mechscope.improve import EvaluationConfig, evaluate
    from mechscope.improve.edit_task import AppliedEdit, EditTask

    record.revert(hm)
    try:
        task = EditTask.for_model(hm, record.requests, neighbourhood=neighbourhood)
        return evaluate(hm, AppliedEdit(record, hm), task, EvaluationConfig(side_tasks=())), task
    finally:
        record.apply(hm)


def _finish(
    hm: Any,
    record: Any,
    record_path: Path | None,
    save_model: Path | None,
    metrics_path: Path | None,
    neighbourhood: Any,
) -> None:
    from mechscope.steer.editing.metrics import edit_metrics

    result, task = _evaluate_edit(hm, record, neighbourhood)
    typer.echo(result.table())
    for request in task.requests:
        subjects = ", ".join(p for p, _ in request.neighbours[:6])
        more = f" and {len(request.neighbours) - 6} more" if len(request.neighbours) > 6 else ""
        typer.echo(f"neighbours of {request.subject!r}: {subjects}{more}")
    if metrics_path is not None:
        metrics = edit_metrics(hm, record=record, neighbourhood=neighbourhood)
        typer.echo(f"metrics: {metrics.save(metrics_path)}")
    if record_path is not None:
        typer.echo(f"edit record: {record.save(record_path)}")
    if save_model is not None:
        _save_model(hm, save_model)
        typer.echo(f"edited model: {save_model}")


@edit_app.command("stats")
def stats_cmd(
    model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
    layer: Annotated[list[int], typer.Option("--layer", "-l", help="Layer (repeatable).")],
    n_tokens: Annotated[int, typer.Option(help="Tokens to average over.")] = 20_000,
    seq_len: Annotated[int, typer.Option(help="Window length in tokens.")] = 64,
    text_file: Annotated[
        Path | None,
        typer.Option(
            help="Text file, one document per line (default: the model's default text; English on real models)."
        ),
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache folder (default $MECHSCOPE_CACHE/stats).")] = None,
) -> None:
    """Compute (or find cached) second-moment statistics E(k k^T) of MLP keys; resumable."""
    offline_by_default()
    from mechscope.cli.common import load_model
    from mechscope.errors import MechscopeError
    from mechscope.steer.editing.stats import StatsConfig, default_cache_dir, second_moments

    try:
        hm = load_model(model)
        texts, stream = _user_texts(text_file)
        config = StatsConfig(n_tokens=n_tokens, seq_len=seq_len, stream=stream)
        stats = second_moments(hm, layer, config=config, texts=texts, cache_dir=cache_dir, progress=True)
    except (MechscopeError, OSError) as exc:
        raise fail(exc) from exc
    for index, mom2 in stats.items():
        typer.echo(f"layer {index}: E[kk^T] {tuple(mom2.shape)}, mean diagonal {float(mom2.diagonal().mean()):.4g}")
    typer.echo(f"cached under {cache_dir or default_cache_dir()}")


@edit_app.command("rome")
@config_options(ROMEConfig, exclude=("stats",))
def rome_cmd(
    model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
    prompt: Annotated[str | None, typer.Option(help="Prompt with '{}' for the subject, e.g. '{} lives in'.")] = None,
    subject: Annotated[str | None, typer.Option(help="The subject, e.g. 'Vouldeis'.")] = None,
    target: Annotated[str | None, typer.Option(help="The new target, e.g. ' Tarrow' (mind the leading space).")] = None,
    paraphrase: Annotated[list[str], typer.Option(help="Paraphrase prompt (subject written out; repeatable).")] = [],  # noqa: B006
    world: Annotated[
        int, typer.Option(help="Instead, N counterfactual facts of the organisms' world, one by one.")
    ] = 0,
    *,
    config: ROMEConfig,
    record: Annotated[Path | None, typer.Option(help="Write the edit record (.safetensors) here.")] = None,
    save_model: Annotated[Path | None, typer.Option(help="Write the edited model folder here.")] = None,
    metrics: Annotated[Path | None, typer.Option(help="Write the metrics result (.safetensors) here.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Statistics cache folder.")] = None,
    stats_tokens: Annotated[int, typer.Option(help="Tokens of text for the key statistics.")] = 20_000,
    text_file: Annotated[Path | None, typer.Option(help=TEXT_HELP)] = None,
    neighbour: Annotated[list[str], typer.Option(help=NEIGHBOUR_HELP)] = [],  # noqa: B006
    n_neighbours: Annotated[int, typer.Option(help="Neighbour subjects built automatically.")] = 14,
    neighbour_kind: Annotated[str, typer.Option(help=KIND_HELP)] = "",
) -> None:
    """Rewrite one fact with ROME and report efficacy / paraphrase / neighbourhood before and after.

    With ``--world N``, N facts of the organisms' world are edited one at a time (each reverted after
    it is measured) and the mean metrics are printed.
    """
    offline_by_default()
    from mechscope.cli.common import load_model
    from mechscope.errors import ConfigError, MechscopeError
    from mechscope.steer.editing.metrics import edit_metrics
    from mechscope.steer.editing.requests import EditRequest, world_requests
    from mechscope.steer.editing.rome import rome
    from mechscope.steer.editing.stats import StatsConfig, second_moments

    try:
        texts, stream = _user_texts(text_file)
        config = replace(config, stats=StatsConfig(n_tokens=stats_tokens, stream=stream))
        folder = str(cache_dir) if cache_dir else None
        near = _neighbourhood(neighbour, n_neighbours, neighbour_kind)
        if world:
            if prompt or subject or target or record or save_model or metrics:
                raise ConfigError(
                    "--world measures many edits one by one; drop --prompt/--subject/--target/--record/"
                    "--save-model/--metrics"
                )
            hm = load_model(model)
            sums: dict[str, dict[str, float]] = {}
            for i, request in enumerate(world_requests(world)):
                rec = rome(hm, request, config, cache_dir=folder, progress=i == 0)
                summary = edit_metrics(hm, record=rec).summary()
                rec.revert(hm)
                for name, values in summary.items():
                    for state, v in values.items():
                        sums.setdefault(name, {}).setdefault(state, 0.0)
                        sums[name][state] += v / world
            typer.echo(f"ROME, {world} facts edited one at a time (layer {config.resolved_layer(hm)}), mean:")
            typer.echo(f"{'metric':26s}{'before':>10s}{'after':>10s}")
            for name, values in sums.items():
                typer.echo(f"{name:26s}{values['before']:10.3f}{values['after']:10.3f}")
            return
        if prompt is None or subject is None or target is None:
            raise ConfigError("give --prompt, --subject and --target (or --world N)")
        hm = load_model(model)
        request = EditRequest(prompt=prompt, subject=subject, target=target, paraphrases=tuple(paraphrase))
        mom2 = None
        if texts is not None:
            at = config.resolved_layer(hm)
            mom2 = second_moments(hm, [at], config=config.stats, texts=texts, cache_dir=cache_dir, progress=True)[at]
        rec = rome(hm, request, config, mom2=mom2, cache_dir=folder, progress=True)
        typer.echo(f"ROME edit of layer {rec.info['layer']} in {rec.info['rounds']} round(s); changed {rec.changed()}")
        _finish(hm, rec, record, save_model, metrics, near)
    except MechscopeError as exc:
        raise fail(exc) from exc


@edit_app.command("memit")
@config_options(MEMITConfig, exclude=("stats", "layers"))
def memit_cmd(
    model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
    requests: Annotated[
        Path | None, typer.Option(help="JSON list of {prompt, subject, target[, paraphrases, neighbours]}.")
    ] = None,
    world: Annotated[int, typer.Option(help="Instead, N counterfactual facts of the organisms' world.")] = 0,
    layer: Annotated[list[int], typer.Option("--layer", "-l", help="Layers to edit (repeatable).")] = [],  # noqa: B006
    *,
    config: MEMITConfig,
    record: Annotated[Path | None, typer.Option(help="Write the edit record (.safetensors) here.")] = None,
    save_model: Annotated[Path | None, typer.Option(help="Write the edited model folder here.")] = None,
    metrics: Annotated[Path | None, typer.Option(help="Write the metrics result (.safetensors) here.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Statistics cache folder.")] = None,
    stats_tokens: Annotated[int, typer.Option(help="Tokens of text for the key statistics.")] = 20_000,
    text_file: Annotated[Path | None, typer.Option(help=TEXT_HELP)] = None,
    n_neighbours: Annotated[int, typer.Option(help="Neighbour subjects built per request without neighbours.")] = 14,
    neighbour_kind: Annotated[str, typer.Option(help=KIND_HELP)] = "",
) -> None:
    """Write many facts at once with MEMIT and report the edit metrics before and after."""
    offline_by_default()
    from mechscope.cli.common import load_model
    from mechscope.errors import ConfigError, MechscopeError
    from mechscope.steer.editing.memit import memit
    from mechscope.steer.editing.requests import EditRequest, world_requests
    from mechscope.steer.editing.stats import StatsConfig, second_moments

    try:
        if (requests is None) == (world == 0):
            raise ConfigError("give exactly one of --requests FILE or --world N")
        if requests is not None:
            try:
                data = json.loads(requests.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"cannot read requests from {str(requests)!r}: {exc}") from exc
            if not isinstance(data, list):
                raise ConfigError(f"{str(requests)!r} must hold a JSON list of requests; got {type(data).__name__}")
            reqs = [EditRequest.from_dict(d) for d in data]
        else:
            reqs = world_requests(world)
        hm = load_model(model)
        texts, stream = _user_texts(text_file)
        config = replace(config, layers=tuple(layer) or None, stats=StatsConfig(n_tokens=stats_tokens, stream=stream))
        mom2 = None
        if texts is not None:
            at = config.resolved_layers(hm)
            mom2 = second_moments(hm, at, config=config.stats, texts=texts, cache_dir=cache_dir, progress=True)
        rec = memit(hm, reqs, config, mom2=mom2, cache_dir=str(cache_dir) if cache_dir else None, progress=True)
        typer.echo(f"MEMIT edit of {len(reqs)} facts in layers {rec.info['layers']}")
        _finish(hm, rec, record, save_model, metrics, _neighbourhood([], n_neighbours, neighbour_kind))
    except MechscopeError as exc:
        raise fail(exc) from exc


@edit_app.command("revert")
def revert_cmd(
    model: Annotated[str, typer.Argument(help="The edited model folder.")],
    record: Annotated[Path, typer.Argument(help="The edit record written by `edit rome/memit --record`.")],
    out: Annotated[Path, typer.Option(help="Folder to write the restored model to.")],
) -> None:
    """Undo an edit exactly: restore the recorded weights (the model must hold the edit's weights)."""
    offline_by_default()
    from mechscope.cli.common import load_model
    from mechscope.errors import MechscopeError
    from mechscope.steer.editing.records import EditRecord

    try:
        hm = load_model(model)
        rec = EditRecord.load(record)
        rec.revert(hm)
    except MechscopeError as exc:
        raise fail(exc) from exc
    _save_model(hm, out)
    typer.echo(f"restored {len(rec.names)} parameter(s) bit for bit to their values before the {rec.method} edit")
    typer.echo(f"restored model: {out}")
