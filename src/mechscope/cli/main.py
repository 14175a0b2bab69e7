"""`mechscope` command: subcommands map one-to-one onto library functions."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Annotated

import typer

from mechscope.cli.common import fail, offline_by_default, set_load_options
from mechscope.cli.errors import ErrorHandlingGroup

app = typer.Typer(
    help="mechscope: locate, steer and improve behaviours of Hugging Face causal LMs.",
    no_args_is_help=True,
    add_completion=False,
    cls=ErrorHandlingGroup,
)


@app.callback()
def _record_option(
    record: Annotated[
        bool, typer.Option("--record", help="Record this command as a run (results, config, provenance).")
    ] = False,
    runs: Annotated[
        Path | None,
        typer.Option("--runs", help="Run store for --record (default: $MECHSCOPE_RUNS or ./mechscope-runs)."),
    ] = None,
    tag: Annotated[list[str], typer.Option("--tag", help="Tag for the recorded run (repeatable).")] = [],  # noqa: B006
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="Dtype of every model the command loads: float32 (default), bfloat16 or float16 (bf16/fp16). "
            "Not for the demo, which runs its own models in float32.",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="Device of every model the command loads: cpu (default), cuda, cuda:1, ..."),
    ] = None,
) -> None:
    """Options for every command; mechscope.cli.runs.RecordingGroup acts on --record."""
    set_load_options(dtype=dtype, device=device)


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
    sites: Annotated[bool, typer.Option("--sites/--no-sites", help="List every canonical site.")] = True,
) -> None:
    """Architecture, sizes and site list of a model."""
    offline_by_default()
    from mechscope.cli.common import load_model
    from mechscope.errors import MechscopeError

    try:
        hm = load_model(model)
    except MechscopeError as exc:
        raise fail(exc) from exc
    d = hm.dims
    n_params = sum(p.numel() for p in hm.hf_model.parameters())
    typer.echo(f"model        {model}")
    typer.echo(f"family       {d.family} (model_type {d.model_type}, {type(hm.hf_model).__name__})")
    typer.echo(f"parameters   {n_params:,}")
    typer.echo(f"layers       {d.n_layers}   d_model {d.d_model}   d_mlp {d.d_mlp}   d_vocab {d.d_vocab}")
    typer.echo(f"heads        {d.n_heads} query / {d.n_kv_heads} key-value, d_head {d.d_head}")
    typer.echo(
        f"layout       {'parallel' if d.parallel else 'sequential'} attention/MLP, "
        f"{'gated' if d.gated else 'plain'} MLP, attention sites via {hm.attention_base or 'unavailable'}"
    )
    typer.echo(f"sites        {len(hm.site_names)}")
    if sites:
        for name in hm.site_names:
            typer.echo(f"  {name}")


@app.command()
def cache(
    model: Annotated[str, typer.Argument(help="Model folder or bundled model name.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text (repeat for a batch).")] = [],  # noqa: B006
    prompts_file: Annotated[
        Path | None, typer.Option("--prompts-file", help="UTF-8 text file, one prompt per line (blank lines skipped).")
    ] = None,
    site: Annotated[list[str], typer.Option("--site", "-s", help="Site to cache (repeatable; default: all).")] = [],  # noqa: B006
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output .safetensors file (default: in the output folder).")
    ] = None,
    positions: Annotated[str, typer.Option(help="Comma-separated positions to keep (e.g. '-1' or '0,3').")] = "",
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass (lower it when memory runs out).")] = 32,
) -> None:
    """Run prompts and save the activations of chosen sites to a safetensors file, in batches."""
    offline_by_default()
    import torch

    from mechscope.cli.common import load_model, output_path
    from mechscope.cli.memory import memory_knob
    from mechscope.errors import ConfigError
    from mechscope.io import read_text
    from mechscope.model.cache import ActivationCache

    texts = list(prompt)
    if prompts_file is not None:
        texts += [line for line in read_text(prompts_file, "prompt list").splitlines() if line.strip()]
    if not texts:
        raise ConfigError("give prompts: --prompt TEXT (repeatable) or --prompts-file FILE")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1; got {batch_size}")
    hm = load_model(model)
    try:
        pos = [int(p) for p in positions.split(",") if p.strip()] or None
    except ValueError:
        raise ConfigError(f"--positions must be comma-separated integers (e.g. '-1,0'); got {positions!r}") from None
    # One padding for every batch, so the batches concatenate; positions counted from the end count from each
    # prompt's own end (left padding), so '-1' is every prompt's last real token, never a pad.
    padding = "left" if pos is not None and any(p < 0 for p in pos) else "right"
    tokens = hm.to_tokens(texts, padding_side=padding)
    parts: list[ActivationCache] = []
    for start in range(0, len(texts), batch_size):
        rows = {k: v[start : start + batch_size] for k, v in tokens.items()}
        with memory_knob("--batch-size", batch_size):  # an allocator failure names the knob
            _, acts = hm.run_with_cache(rows, site or None, positions=pos, device="cpu")
        parts.append(acts)
    merged = ActivationCache(
        {name: torch.cat([part[name] for part in parts]) for name in parts[0]},
        positions=parts[0].positions,
        meta={
            **parts[0].meta,
            "model": model,
            "prompts": texts,
            "fingerprint": hm.fingerprint(),
            "padding_side": padding,
            "attention_mask": tokens["attention_mask"].tolist(),
        },
    )
    path = merged.save(output_path(out, "cache.safetensors"))
    typer.echo(f"cached {len(merged)} sites for {len(texts)} prompt(s) in batches of {batch_size} -> {path}")


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="Model folder or bundled name (default: the bundled default).")] = "",
    out: Annotated[Path, typer.Option(help="Folder for the HTML report.")] = Path("mechscope-report"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    section: Annotated[
        list[str],
        typer.Option(
            help="Run only these loops: refusal, facts, sentiment, features (organisms) or induction (any model)."
        ),
    ] = [],  # noqa: B006
    runs: Annotated[
        Path | None,
        typer.Option("--runs", help="Run store for the sections (default: $MECHSCOPE_RUNS or ./mechscope-runs)."),
    ] = None,
    record: Annotated[bool, typer.Option("--record/--no-record", help="Record each section as a run.")] = True,
) -> None:
    """Locate -> Steer -> Improve on the default model; writes a self-contained HTML report."""
    offline_by_default()
    from mechscope.cli.common import load_options
    from mechscope.demo import run_demo
    from mechscope.errors import ConfigError, MechscopeError
    from mechscope.records import default_store_dir

    given = load_options()
    if given:  # refused rather than ignored: the demo's figures are those of its fp32 CPU models
        options = " ".join(f"--{key} {value}" for key, value in given.items())
        raise fail(
            ConfigError(
                f"the demo runs its bundled models in float32 on the CPU and does not take {options}; "
                "those options apply to the other commands (e.g. mechscope --dtype bf16 locate ...)"
            )
        )
    try:
        report = run_demo(
            model or None,
            out,
            seed=seed,
            echo=typer.echo,
            sections=tuple(section) or None,
            runs=(runs or default_store_dir()) if record else None,
        )
    except MechscopeError as exc:
        raise fail(exc) from exc
    typer.echo(f"report written to {report}")


# Optional command groups: (module, attribute, name, help). Each group ships with its own module.
_GROUPS = (
    ("mechscope.cli.zoo", "zoo_app", "zoo", "Bundled model organisms: corpus, train, list, eval."),
    ("mechscope.cli.locate", "locate_app", "locate", "Locate behaviours: lenses, probes, heads, patching, circuits."),
    ("mechscope.cli.steer", "steer_app", "steer", "Steer: ablation, steering vectors, directional ablation."),
    ("mechscope.cli.features", "features_app", "features", "Sparse autoencoders: train on a site, evaluate."),
    ("mechscope.cli.edit", "edit_app", "edit", "Knowledge editing (ROME, MEMIT) with exact revert."),
    ("mechscope.cli.evaluate", "eval_app", "eval", "Evaluate an intervention on its target and its side effects."),
    ("mechscope.cli.runs", "runs_app", "runs", "Run records: list, show, compare, export, gc, delete."),
    ("mechscope.cli.detect", "detect_app", "detect", "Detectors: train, calibrate, evaluate (probes, anomaly)."),
    ("mechscope.cli.detect", "monitor_app", "monitor", "Run a calibrated detector during generation."),
)


def _mount_subcommands() -> None:
    from importlib import import_module
    from importlib.util import find_spec

    for module_name, attr, name, help_text in _GROUPS:
        if find_spec(module_name) is None:
            continue
        app.add_typer(getattr(import_module(module_name), attr), name=name, help=help_text)


_mount_subcommands()
app.command("serve")(import_module("mechscope.cli.serve").serve)
app.command("diff")(import_module("mechscope.cli.diff").diff_command)
app.command("clean")(import_module("mechscope.cli.clean").clean)
