"""``mechscope locate eap | eap-ig | acdc | circuit-faithfulness``: circuit discovery from the command line.

Prompts come from a JSONL file, one contrast pair per line::

    {"clean": "...", "corrupt": "...", "answer": " Mara", "wrong": " Tobin"}

and the metric is the logit difference ``answer - wrong`` (each a single token) at the last token.
Clean and corrupted prompts must tokenise to the same length. ``answer``/``wrong`` may be omitted
for ``acdc``, which then measures damage by KL divergence from the full model. The older keys
``correct``/``incorrect`` are still read, with a deprecation note (one naming across the CLI).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mechscope.cli.common import Quiet, fail
from mechscope.cli.verb import config_options
from mechscope.errors import ConfigError, MechscopeError
from mechscope.locate.circuits.eap import EAPConfig

if TYPE_CHECKING:
    from mechscope.locate.circuits import Circuit
    from mechscope.model.hooked import HookedModel

ModelArg = Annotated[str, typer.Argument(help="Model folder or bundled model name.")]
DataOpt = Annotated[Path, typer.Option("--data", "-d", help="JSONL file of {clean, corrupt, answer, wrong}.")]
AblationOpt = Annotated[str, typer.Option(help="What removed edges carry: resample, mean or zero.")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Write the result (.safetensors).")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write the circuit as JSON.")]
HtmlOpt = Annotated[Path | None, typer.Option("--html", help="Write the circuit as a self-contained HTML graph.")]


def read_pairs(path: Path, *, need_answers: bool = True) -> list[dict[str, str]]:
    """Contrast pairs from a JSONL file, validated line by line."""
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    rows: list[dict[str, str]] = []
    keys = ("clean", "corrupt", "answer", "wrong") if need_answers else ("clean", "corrupt")
    renamed: set[str] = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not JSON ({exc})") from exc
        for old, new in (("correct", "answer"), ("incorrect", "wrong")):
            if isinstance(row, dict) and old in row and new not in row:
                row[new] = row.pop(old)
                renamed.add(old)
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in keys):
            raise ConfigError(f"{path}:{number}: expected an object with string fields {list(keys)}; got {row!r}")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path} holds no prompt pairs")
    if renamed:
        typer.secho(
            f"note: the JSONL keys {sorted(renamed)} are deprecated; call them 'answer' and 'wrong'",
            fg=typer.colors.YELLOW,
            err=True,
        )
    return rows


def _setup(model_name: str, data: Path, need_answers: bool = True) -> tuple[HookedModel, list[str], list[str], Any]:
    import torch

    from mechscope.cli.common import load_model
    from mechscope.metrics import logit_diff_metric

    rows = read_pairs(data, need_answers=need_answers)
    model = load_model(model_name)
    clean, corrupt = [r["clean"] for r in rows], [r["corrupt"] for r in rows]
    if not need_answers or any("answer" not in r for r in rows):
        return model, clean, corrupt, None
    good = torch.tensor([model.to_single_token(r["answer"]) for r in rows])
    bad = torch.tensor([model.to_single_token(r["wrong"]) for r in rows])
    # Each row is scored at its last real token: the circuit methods pass the attention mask.
    return model, clean, corrupt, logit_diff_metric(good, bad)


def _write_circuit(circuit: Circuit, out: Path | None, json_path: Path | None, html: Path | None) -> None:
    from mechscope.locate.circuits import save_circuit_json, write_circuit_html

    if out is not None:
        typer.echo(f"circuit -> {circuit.save(out)}")
    if json_path is not None:
        typer.echo(f"circuit JSON -> {save_circuit_json(circuit, json_path)}")
    if html is not None:
        typer.echo(f"circuit graph -> {write_circuit_html(circuit, html)}")


def _attribution(
    method: str,
    model: str,
    data: Path,
    ablation: str,
    steps: int,
    batch_size: int | None,
    top: int,
    out: Any,
    json_path: Any,
    html: Any,
    progress: bool = False,
) -> None:
    from mechscope.locate.circuits import eap, eap_ig

    try:
        hm, clean, corrupt, metric = _setup(model, data)
        if method == "eap":
            scores = eap(hm, clean, corrupt, metric, ablation=ablation, batch_size=batch_size)
        else:
            scores = eap_ig(
                hm, clean, corrupt, metric, ablation=ablation, steps=steps, batch_size=batch_size, progress=progress
            )
        circuit = scores.top(min(top, scores["scores"].shape[0]))
        typer.echo(f"{method}: {len(scores.edge_names):,} edges scored; metric {float(scores['metric']):.4f}")
        for index in scores.ranking()[: min(top, 20)].tolist():
            typer.echo(f"  {scores.edge_names[index]:32s} {float(scores['scores'][index]):+.4f}")
        if out is not None:
            typer.echo(f"scores -> {scores.save(out)}")
        _write_circuit(circuit, None, json_path, html)
    except MechscopeError as exc:
        raise fail(exc) from exc


def register(app: typer.Typer) -> None:
    """Add the circuit commands to the ``locate`` group."""

    @app.command("eap")
    @config_options(EAPConfig, exclude=("steps",))
    def eap_command(
        model: ModelArg,
        data: DataOpt,
        config: EAPConfig,
        top: Annotated[int, typer.Option(help="Edges kept in the exported circuit (by |score|).")] = 50,
        out: OutOpt = None,
        json_path: JsonOpt = None,
        html: HtmlOpt = None,
    ) -> None:
        """Edge attribution patching: score every edge of the model's graph."""
        _attribution("eap", model, data, config.ablation, 1, config.batch_size, top, out, json_path, html)

    @app.command("eap-ig")
    @config_options(EAPConfig)
    def eap_ig_command(
        model: ModelArg,
        data: DataOpt,
        config: EAPConfig,
        top: Annotated[int, typer.Option(help="Edges kept in the exported circuit (by |score|).")] = 50,
        out: OutOpt = None,
        json_path: JsonOpt = None,
        html: HtmlOpt = None,
        quiet: Quiet = False,
    ) -> None:
        """EAP with integrated gradients over the input embeddings."""
        args = (config.ablation, config.steps, config.batch_size, top, out, json_path, html, not quiet)
        _attribution("eap-ig", model, data, *args)

    @app.command("acdc")
    def acdc_command(
        model: ModelArg,
        data: DataOpt,
        threshold: Annotated[float, typer.Option(help="Remove an edge when damage grows by less than this.")],
        ablation: AblationOpt = "resample",
        max_damage: Annotated[float | None, typer.Option(help="Hard bound on the circuit's damage.")] = None,
        kl: Annotated[bool, typer.Option("--kl/--metric", help="Damage as KL (default) or as metric change.")] = True,
        max_minutes: Annotated[
            float | None,
            typer.Option(help="Refuse up front when the estimated worst case exceeds this (0: no limit)."),
        ] = 60.0,
        out: OutOpt = None,
        json_path: JsonOpt = None,
        html: HtmlOpt = None,
        quiet: Quiet = False,
    ) -> None:
        """ACDC: prune edges greedily from the logits backwards."""
        from mechscope.locate.circuits import acdc

        try:
            hm, clean, corrupt, metric = _setup(model, data, need_answers=not kl)
            circuit = acdc(
                hm,
                clean,
                corrupt,
                None if kl else metric,
                threshold=threshold,
                ablation=ablation,
                max_damage=max_damage,
                progress=not quiet,
                max_seconds=None if not max_minutes else 60 * max_minutes,
            )
            total, damage = len(circuit.labels["edge"]), circuit.config["damage"]
            typer.echo(f"acdc: kept {circuit.n_edges} of {total} edges; damage {damage:.4g}")
            for edge in circuit.edges[:50]:
                typer.echo(f"  {edge}")
            _write_circuit(circuit, out, json_path, html)
        except MechscopeError as exc:
            raise fail(exc) from exc

    @app.command("circuit-faithfulness")
    def faithfulness_command(
        model: ModelArg,
        data: DataOpt,
        circuit_json: Annotated[Path, typer.Option("--circuit", help="Circuit JSON written by --json.")],
        ablation: AblationOpt = "resample",
    ) -> None:
        """Metric of a circuit with its complement ablated, against the full model and the empty graph."""
        from mechscope.locate.circuits import faithfulness, load_circuit_json

        try:
            hm, clean, corrupt, metric = _setup(model, data)
            result = faithfulness(hm, load_circuit_json(circuit_json), clean, corrupt, metric, ablation=ablation)
            typer.echo(
                f"faithfulness {result.value:.4f}: circuit {float(result['circuit']):.4f}, "
                f"full {float(result['full']):.4f}, empty {float(result['empty']):.4f}"
            )
        except MechscopeError as exc:
            raise fail(exc) from exc
