"""``mechscope runs list|show|compare|export|gc|delete`` and the global ``mechscope --record <command>``.

``--record`` is a top-level option, so it applies to every command without each declaring it and without
clashing with commands' own options. It records the command as one run: its name and parsed options as
the config, every result and artifact it builds, and its outcome (a command that fails is recorded as
failed, with its error).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from mechscope.cli.common import fail

runs_app = typer.Typer(help="Run records: list, show, compare, export, gc.", no_args_is_help=True)

RunsOption = Annotated[
    Path | None,
    typer.Option("--runs", help="Run store folder (default: $MECHSCOPE_RUNS or ./mechscope-runs)."),
]


def _store(runs: Path | None, *, read_only: bool = False) -> Any:
    from mechscope.records import open_store

    return open_store(runs, read_only=read_only)


@runs_app.command("list")
def list_cmd(
    runs: RunsOption = None,
    text: Annotated[str, typer.Option("--filter", "-f", help="Text in the name, description or id.")] = "",
    tag: Annotated[str, typer.Option(help="Only runs with this tag.")] = "",
    method: Annotated[str, typer.Option(help="Only runs of this method.")] = "",
    status: Annotated[str, typer.Option(help="running, finished or failed.")] = "",
    limit: Annotated[int, typer.Option(help="At most this many (newest first).")] = 50,
) -> None:
    """Runs in the store, newest first."""
    from mechscope.errors import MechscopeError

    try:
        with _store(runs) as store:
            found = store.runs(text=text, tag=tag, method=method, status=status, limit=limit)
    except MechscopeError as exc:
        raise fail(exc) from exc
    if not found:
        typer.echo("no runs")
        return
    typer.echo(f"{'id':22s}  {'status':8s}  {'started (UTC)':19s}  {'wall':>8s}  name [tags]  method")
    for r in found:
        wall = "" if r.wall_s is None else f"{r.wall_s:.1f}s"
        tags = f" [{', '.join(r.tags)}]" if r.tags else ""
        started = r.started_at[:19].replace("T", " ")
        typer.echo(f"{r.id:22s}  {r.status:8s}  {started:19s}  {wall:>8s}  {r.name}{tags}  {r.method}")


@runs_app.command("show")
def show_cmd(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    runs: RunsOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole record as JSON.")] = False,
) -> None:
    """One run: provenance, config, metrics and files."""
    from mechscope.errors import MechscopeError

    try:
        with _store(runs) as store:
            r = store.get(run_id)
            paths = {a.name: store.root / a.relative_path for a in r.artifacts}
    except MechscopeError as exc:
        raise fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(r.to_json(), indent=2))
        return
    typer.echo(f"{r.name}  ({r.id}, {r.status})")
    for label, value in (
        ("method", r.method),
        ("seed", r.seed),
        ("started", r.started_at),
        ("wall", None if r.wall_s is None else f"{r.wall_s:.3f} s"),
        ("git", f"{r.git_commit}{' (dirty)' if r.git_dirty else ''}" if r.git_commit else None),
        ("command", r.command),
        ("tags", ", ".join(r.tags)),
        ("error", r.error),
    ):
        if value not in (None, ""):
            typer.echo(f"  {label:9s} {value}")
    typer.echo("  versions  " + ", ".join(f"{k} {v}" for k, v in sorted(r.versions.items())))
    for m in r.models:
        typer.echo(f"  model     {m.source}  fingerprint {m.fingerprint}  weights {m.weights_sha256[:16] or '-'}")
    typer.echo(f"  config    {json.dumps(r.config, sort_keys=True)}")
    for name, series in sorted(r.metrics.items()):
        last = series[max(series)]
        steps = f"  ({len(series)} steps)" if set(series) != {-1} else ""
        typer.echo(f"  metric    {name} = {last:.6g}{steps}")
    for a in r.artifacts:
        state = "" if paths[a.name].is_file() else "  MISSING"
        typer.echo(f"  file      {a.name} ({a.role}, {a.method or a.ext}, {a.size} B) {a.relative_path}{state}")


@runs_app.command("compare")
def compare_cmd(
    run_ids: Annotated[list[str], typer.Argument(help="Two or more run ids.")],
    runs: RunsOption = None,
) -> None:
    """Metrics side by side, then the config and provenance entries that differ (Markdown)."""
    from mechscope.errors import MechscopeError
    from mechscope.records import compare

    try:
        with _store(runs) as store:
            typer.echo(compare(store, run_ids).table())
    except MechscopeError as exc:
        raise fail(exc) from exc


@runs_app.command("export")
def export_cmd(
    run_ids: Annotated[list[str] | None, typer.Argument(help="Run ids (default: all).")] = None,
    runs: RunsOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="JSON file (default: standard output).")] = None,
) -> None:
    """The records (not the files) as one JSON document."""
    from mechscope.errors import MechscopeError

    try:
        with _store(runs) as store:
            text = json.dumps(store.export(run_ids or None), indent=2)
    except MechscopeError as exc:
        raise fail(exc) from exc
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n", encoding="utf-8")
        typer.echo(f"exported to {out}")


@runs_app.command("gc")
def gc_cmd(
    runs: RunsOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be deleted; delete nothing.")] = False,
) -> None:
    """Delete artifact files that no run references (e.g. after `runs delete`)."""
    from mechscope.errors import MechscopeError

    try:
        with _store(runs) as store:
            report = store.gc(dry_run=dry_run)
    except MechscopeError as exc:
        raise fail(exc) from exc
    verb = "would delete" if dry_run else "deleted"
    for path in report.removed:
        typer.echo(f"  {verb} {path}")
    typer.echo(f"{verb} {len(report.removed)} file(s), {report.freed_bytes} bytes; kept {report.kept}")


@runs_app.command("delete")
def delete_cmd(
    run_ids: Annotated[list[str], typer.Argument(help="Run ids to delete.")],
    runs: RunsOption = None,
) -> None:
    """Delete run records (their files go at the next `runs gc` if no other run uses them)."""
    from mechscope.errors import MechscopeError

    try:
        with _store(runs) as store:
            for run_id in run_ids:
                store.delete_run(run_id)
                typer.echo(f"deleted run {run_id}")
    except MechscopeError as exc:
        raise fail(exc) from exc


# --record ----------------------------------------------------------------------------------------------------
class _CommandRun:
    """records.run around one CLI invocation; a clean ``typer.Exit(0)`` counts as success, other exits
    and exceptions as failure with the underlying error's message."""

    def __init__(self, **kwargs: Any) -> None:
        from mechscope.records import run

        self._cm = run(**kwargs)

    def __enter__(self) -> Any:
        self.run = self._cm.__enter__()
        return self.run

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool | None:
        if exc is not None and getattr(exc, "exit_code", None) == 0:  # typer.Exit(0) / click's Exit(0)
            return self._cm.__exit__(None, None, None)
        if exc is not None:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            code = getattr(exc, "exit_code", None)
            where = f" (exit code {code})" if code is not None else ""
            self.run.fail(f"{type(cause).__name__}: {cause}{where}")
        return self._cm.__exit__(exc_type, exc, tb)


def _is_group(command: Any) -> bool:
    # duck-typed: typer may vendor its own click, whose Group is not click.Group
    return callable(getattr(command, "get_command", None)) and callable(getattr(command, "list_commands", None))


def _invoked(ctx: Any) -> tuple[str, dict[str, Any]]:
    """The subcommand path ('locate lens') and its parsed options, without running it."""
    protected = getattr(ctx, "_protected_args", None)
    if protected is None:  # click < 8.2 keeps them public
        protected = getattr(ctx, "protected_args", [])
    args = [*protected, *ctx.args]
    command: Any = ctx.command
    path: list[str] = []
    while _is_group(command) and args:
        sub = command.get_command(ctx, args[0])
        if sub is None:
            break
        path.append(args.pop(0))
        command = sub
    params: dict[str, Any] = {}
    if path and not _is_group(command):
        try:
            sub_ctx = command.make_context(path[-1], list(args), parent=ctx, resilient_parsing=True)
            params = dict(sub_ctx.params)
        except Exception:  # the command itself will report bad arguments; keep them raw here
            params = {"argv": args}
    return " ".join(path), json.loads(json.dumps(params, default=str))


#: Commands that read the store rather than produce results: --record leaves them alone.
_UNRECORDED = ("runs", "serve")


class RecordingGroup(TyperGroup):
    """The root command group: with ``--record`` it runs the chosen command inside a recorded run.

    It acts in ``invoke``, where the subcommand's arguments are still at hand, so the run is named after
    the command path ('locate logit-lens') and its config is the command's parsed options.
    """

    def invoke(self, ctx: Any) -> Any:
        if not ctx.params.get("record"):
            return super().invoke(ctx)
        name, params = _invoked(ctx)
        if name.split(" ")[0] in _UNRECORDED:
            typer.secho(f"note: `{name}` reads run records; it is not recorded itself", err=True)
            return super().invoke(ctx)
        argv = sys.argv[1:] if sys.argv and Path(sys.argv[0]).name == "mechscope" else []
        with _CommandRun(
            name=name or "mechscope",
            tags=["cli", *(ctx.params.get("tag") or [])],
            store=ctx.params.get("runs"),
            config=params,
            method=name,
            command=" ".join(["mechscope", *argv]) if argv else f"mechscope {name}",
            model_source=str(params["model"]) if isinstance(params.get("model"), str) else None,
        ):
            return super().invoke(ctx)


__all__ = ["RecordingGroup", "runs_app"]
