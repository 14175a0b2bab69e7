"""``mechscope detect train|calibrate|eval`` and ``mechscope monitor generate``: detectors from contrast
data, calibrated on controls, evaluated with bootstrap intervals, and run during generation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mechscope.cli.common import fail, offline_by_default, output_path, write_figure
from mechscope.cli.verb import config_options
from mechscope.improve.detect.detectors import DetectorConfig

detect_app = typer.Typer(help="Detectors: train, calibrate, evaluate.", no_args_is_help=True)
monitor_app = typer.Typer(help="Run a detector while the model generates.", no_args_is_help=True)

ModelArg = Annotated[str, typer.Argument(help="Model folder or bundled model name.")]
DetectorArg = Annotated[Path, typer.Argument(help="A saved detector (.safetensors).")]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Built-in contrast set: instructed_lying, true_false, dangerous, harmful, backdoor "
        "(mechscope.data.detection).",
    ),
]
FileOpt = Annotated[Path | None, typer.Option(help="Text file, one example per line; TAB separates prompt | response.")]
HoldOpt = Annotated[
    list[str], typer.Option("--hold-out", help="Group (topic) of a built-in set kept out of fitting (repeatable).")
]


def read_examples(path: Path) -> list[Any]:
    """Examples from a text file: one per line, ``prompt<TAB>response`` for pairs; blank lines skipped."""
    from mechscope.errors import ConfigError
    from mechscope.io import read_text

    if not path.is_file():
        raise ConfigError(f"no example file at {path}")
    out: list[Any] = []
    for line in read_text(path, "example").splitlines():
        if not line.strip():
            continue
        out.append(tuple(line.split("\t", 1)) if "\t" in line else line.replace("\\n", "\n"))
    if not out:
        raise ConfigError(f"{path} holds no examples (expected one per line)")
    return out


def _contrast(data: str | None, positive: Path | None, negative: Path | None, hold_out: list[str]) -> tuple:
    """(positives, negatives, held-out positives, held-out negatives) from a built-in set or files."""
    from mechscope.data.detection import detection_set
    from mechscope.errors import ConfigError

    if data is not None:
        if positive is not None or negative is not None:
            raise ConfigError("give --data or --positive/--negative files, not both")
        full = detection_set(data)
        fit = full.select(hold_out, exclude=True) if hold_out else full
        held = full.select(hold_out) if hold_out else None
        return fit.positives(), fit.negatives(), held.positives() if held else None, held.negatives() if held else None
    if positive is None or negative is None:
        raise ConfigError("give --data NAME or both --positive and --negative example files")
    return read_examples(positive), read_examples(negative), None, None


@detect_app.command("train")
@config_options(
    DetectorConfig,
    exclude=("shrinkage",),
    names={"sites": ("--site", "-s")},
    helps={"sites": "Per-token site (repeatable; several are concatenated, or combined by mahalanobis)."},
)
def train(
    model: ModelArg,
    config: DetectorConfig,
    data: DataOpt = None,
    positive: FileOpt = None,
    negative: FileOpt = None,
    normal: Annotated[Path | None, typer.Option(help="Normal examples (mahalanobis), one per line.")] = None,
    normal_requests: Annotated[
        bool, typer.Option("--normal-requests", help="Use the organisms' clean chat requests as normal data.")
    ] = False,
    hold_out: HoldOpt = [],  # noqa: B006
    description: Annotated[str, typer.Option(help="What the training data is (saved with the detector).")] = "",
    out: Annotated[Path | None, typer.Option(help="Output .safetensors.")] = None,
) -> None:
    """Fit a detector (probe / mean difference on contrast data, or an anomaly detector on normal data)."""
    offline_by_default()
    from mechscope.cli.common import load_model
    from mechscope.errors import MechscopeError
    from mechscope.improve.detect import evaluate_detector, train_detector

    try:
        hm = load_model(model)
        cfg = config
        if cfg.kind == "mahalanobis":
            from mechscope.data.detection import organism_requests

            normal_ex = organism_requests("train") if normal_requests else read_examples(normal) if normal else None
            if normal_ex is None:
                raise typer.BadParameter("the mahalanobis detector needs --normal FILE or --normal-requests")
            det = train_detector(hm, cfg, normal=normal_ex, description=description or "normal examples")
            held = None
        else:
            pos, neg, held_pos, held_neg = _contrast(data, positive, negative, hold_out)
            desc = description or (f"{data} (held out: {hold_out})" if data else f"{positive} vs {negative}")
            det = train_detector(hm, cfg, positive=pos, negative=neg, description=desc)
            held = (held_pos, held_neg) if held_pos and held_neg else None
        path = det.save(output_path(out, "detector.safetensors"))
        typer.echo(f"{det.describe()} fitted on {det.training.get('n_tokens')} tokens -> {path}")
        if held is not None:
            report = evaluate_detector(det, hm, held[0], held[1], n_boot=200)
            typer.echo(f"held-out groups {hold_out}:\n{report.table()}")
    except MechscopeError as exc:
        raise fail(exc) from exc


@detect_app.command("calibrate")
def calibrate_cmd(
    model: ModelArg,
    detector: DetectorArg,
    controls: Annotated[Path | None, typer.Option(help="Control (normal) examples, one per line.")] = None,
    data: DataOpt = None,
    control_requests: Annotated[
        bool, typer.Option("--control-requests", help="Use the organisms' held-out-template clean requests.")
    ] = False,
    fpr: Annotated[float, typer.Option(help="Target false-positive rate on the controls.")] = 0.01,
    out: Annotated[Path | None, typer.Option(help="Output .safetensors (default: overwrite the detector).")] = None,
) -> None:
    """Set the alert threshold at a target false-positive rate on control data."""
    offline_by_default()
    from mechscope.cli.common import load_model
    from mechscope.data.detection import detection_set, organism_requests
    from mechscope.errors import ConfigError, MechscopeError
    from mechscope.improve.detect import Detector, calibrate

    try:
        hm = load_model(model)
        det = Detector.load(detector, hm)
        if sum(x is not None and x is not False for x in (controls, data, control_requests)) != 1:
            raise ConfigError("give exactly one of --controls FILE, --data NAME (its negatives), --control-requests")
        if controls is not None:
            ctrl, desc = read_examples(controls), str(controls)
        elif data is not None:
            ctrl, desc = detection_set(data).negatives(), f"negatives of {data}"
        else:
            ctrl, desc = organism_requests("heldout"), "organism requests, held-out templates"
        cal = calibrate(det, hm, ctrl, target_fpr=fpr, description=desc)
        path = cal.save(out or detector)
        c = cal.calibration
        typer.echo(
            f"threshold {cal.threshold:.4g}: {c['calibration_fpr']:.3f} of {c['n_controls']} controls alert "
            f"(target {fpr:g}, standard error on new data {c['fpr_standard_error']:.3f}) -> {path}"
        )
    except MechscopeError as exc:
        raise fail(exc) from exc


@detect_app.command("eval")
def eval_cmd(
    model: ModelArg,
    detector: DetectorArg,
    data: DataOpt = None,
    positive: FileOpt = None,
    negative: FileOpt = None,
    hold_out: HoldOpt = [],  # noqa: B006
    shifted_positive: Annotated[Path | None, typer.Option(help="Shifted-distribution positives.")] = None,
    shifted_negative: Annotated[Path | None, typer.Option(help="Shifted-distribution negatives.")] = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
    figure: Annotated[Path | None, typer.Option(help="Write the ROC + histogram figure (HTML).")] = None,
    out: Annotated[Path | None, typer.Option(help="Save the report (.safetensors).")] = None,
) -> None:
    """AUROC, recall at 1 % / 5 % FPR and ECE with bootstrap 95 % intervals (held-out and shifted)."""
    offline_by_default()
    from mechscope.cli.common import load_model
    from mechscope.errors import MechscopeError
    from mechscope.improve.detect import Detector, evaluate_detector

    try:
        hm = load_model(model)
        det = Detector.load(detector, hm)
        if data is not None and hold_out:
            _, _, pos, neg = _contrast(data, None, None, hold_out)
        else:
            pos, neg, _, _ = _contrast(data, positive, negative, [])
        shifted = None
        if (shifted_positive is None) != (shifted_negative is None):
            raise typer.BadParameter("give --shifted-positive and --shifted-negative together")
        if shifted_positive is not None and shifted_negative is not None:
            shifted = (read_examples(shifted_positive), read_examples(shifted_negative))
        report = evaluate_detector(det, hm, pos, neg, shifted=shifted, n_boot=n_boot)
        typer.echo(report.table())
        if figure is not None:
            typer.echo(f"figure -> {write_figure(report.plot(), figure)}")
        if out is not None:
            typer.echo(f"report -> {report.save(out)}")
    except MechscopeError as exc:
        raise fail(exc) from exc


@monitor_app.command("generate")
def generate(
    model: ModelArg,
    detector: DetectorArg,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt (repeatable: a batch).")],
    policy: Annotated[str, typer.Option(help="log, stop or intervene.")] = "log",
    direction: Annotated[
        Path | None, typer.Option(help="For --policy intervene: a saved Direction to ablate after an alert.")
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="Override the calibrated threshold.")] = None,
    scope: Annotated[str, typer.Option(help="generated (default) or all (prompt tokens too).")] = "generated",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 20,
    trace_out: Annotated[Path | None, typer.Option("--trace", help="Write the trace as JSON.")] = None,
) -> None:
    """Generate with the detector watching: text, per-token scores and alerts."""
    offline_by_default()
    import json

    import torch

    from mechscope.cli.common import load_model
    from mechscope.errors import ConfigError, MechscopeError
    from mechscope.improve.detect import Detector
    from mechscope.improve.monitor import Monitor
    from mechscope.steer import Direction, directional_ablation

    try:
        hm = load_model(model)
        det = Detector.load(detector, hm)
        intervention = None
        if policy == "intervene":
            if direction is None:
                raise ConfigError("--policy intervene needs --direction FILE (a saved Direction)")
            intervention = directional_ablation(hm, Direction.load(direction, hm))
        mon = Monitor(
            hm,
            det,
            policy=policy,
            intervention=intervention,
            threshold=threshold,
            scope=scope,
        )
        batch = hm.to_tokens(list(prompt), padding_side="left")
        with mon, torch.no_grad():
            out = hm.generate(batch, max_new_tokens=max_new_tokens, do_sample=False)
        trace = mon.trace
        assert trace is not None
        n_prompt = batch["input_ids"].shape[1]
        for r, text in enumerate(prompt):
            row = trace.rows[r]
            reply = hm.to_string(out[r, n_prompt:]) if trace.rows[r].alert is None or policy != "stop" else None
            typer.echo(f"--- prompt {r}: {text!r}")
            if reply is None:
                gen_ids = out[r, n_prompt:].tolist()
                stop_at = gen_ids.index(mon.stop_token) if mon.stop_token in gen_ids else len(gen_ids)
                reply = hm.to_string(gen_ids[:stop_at]) + " [STOPPED BY MONITOR]"
            typer.echo(f"reply: {reply!r}")
            typer.echo(f"scores: {trace.render(hm, r, generated_only=scope == 'generated')}")
            if row.alert is None:
                typer.echo(f"no alert (threshold {trace.threshold:.4g})")
            else:
                where = "generated" if row.generated[row.alert] else "prompt"
                typer.echo(
                    f"ALERT at {where} token {hm.to_string([row.token_ids[row.alert]])!r}: running score "
                    f"{row.running[row.alert]:.4g} > {trace.threshold:.4g}; policy {policy}"
                )
        if trace_out is not None:
            trace_out.write_text(json.dumps(trace.to_dict(), indent=1))
            typer.echo(f"trace -> {trace_out}")
    except MechscopeError as exc:
        raise fail(exc) from exc


__all__ = ["detect_app", "monitor_app", "read_examples"]
