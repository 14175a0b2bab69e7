"""The CLI's verb rule: options generated from config dataclasses, one load -> call -> save -> summary body."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import pytest
import typer
from typer.testing import CliRunner

from mechscope.cli.verb import config_options, field_help, run_verb
from mechscope.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    """Options of a toy verb.

    Attributes:
        steps: optimisation steps (more is slower,
            and more exact).
        lr, decay: learning rate and its decay, both :class:`float`.
        window: layers together (None: a fifth of the depth).
        kinds: which ``kinds`` to use.
        flag: a switch.
        mode: ``fast`` or ``exact``.
    """

    steps: int = 10
    lr: float = 0.1
    decay: float = 0.5
    window: int | None = None
    kinds: tuple[str, ...] = ("a", "b")
    flag: bool = False
    mode: Literal["fast", "exact"] = "fast"
    inner: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1; got {self.steps}")


def _app(**kwargs: object) -> typer.Typer:
    app = typer.Typer()
    seen: list[ToyConfig] = []

    @app.command()
    @config_options(ToyConfig, exclude=("inner",), **kwargs)  # type: ignore[arg-type]
    def toy(
        name: Annotated[str, typer.Argument()],
        config: ToyConfig,
        extra: Annotated[int, typer.Option()] = 1,
    ) -> None:
        seen.append(config)
        typer.echo(f"{name} {extra} {config}")

    app.seen = seen  # type: ignore[attr-defined]
    return app


def test_help_text_is_read_from_the_config_docstring():
    helps = field_help(ToyConfig)
    assert helps["steps"] == "optimisation steps (more is slower, and more exact)."
    assert helps["lr"] == helps["decay"] == "learning rate and its decay, both float."
    assert helps["kinds"] == "which 'kinds' to use."
    assert "inner" not in helps


def test_every_field_becomes_an_option_and_the_command_gets_a_validated_config():
    app = _app()
    args = ["x", "--steps", "3", "--lr", "0.5", "--window", "2", "--kinds", "c", "--kinds", "d", "--flag"]
    out = CliRunner().invoke(app, [*args, "--mode", "exact", "--extra", "7"])
    assert out.exit_code == 0, out.output
    (config,) = app.seen  # type: ignore[attr-defined]
    assert config == ToyConfig(steps=3, lr=0.5, window=2, kinds=("c", "d"), flag=True, mode="exact")
    assert out.output.startswith("x 7 ")
    # Defaults are the config's own.
    CliRunner().invoke(app, ["y"])
    assert app.seen[-1] == ToyConfig()  # type: ignore[attr-defined]
    helped = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "optimisation steps (more is slower, and more exact)" in helped and "--inner" not in helped


def test_an_invalid_value_is_the_configs_own_error_with_exit_code_2():
    out = CliRunner().invoke(_app(), ["x", "--steps", "0"])
    assert out.exit_code == 2 and "steps must be >= 1; got 0" in out.output and "Traceback" not in out.output


def test_defaults_can_be_overridden_for_the_command_line():
    app = _app(defaults={"steps": 4})
    CliRunner().invoke(app, ["x"])
    assert app.seen[-1].steps == 4  # type: ignore[attr-defined]


def test_fields_without_a_command_line_form_are_refused_when_the_command_is_defined():
    with pytest.raises(TypeError, match=r"ToyConfig.inner: a field of type .* has no command-line form"):
        config_options(ToyConfig)
    with pytest.raises(TypeError, match=r"has no field\(s\) \['nope'\]"):
        config_options(ToyConfig, exclude=("inner", "nope"))

    def clashing(config: ToyConfig, steps: int = 1) -> None: ...

    with pytest.raises(TypeError, match=r"option\(s\) \['steps'\] come both from the command and its config"):
        config_options(ToyConfig, exclude=("inner",))(clashing)


def test_run_verb_saves_without_overwriting_and_prints_the_summary(tmp_path, monkeypatch, capsys):
    import torch

    from mechscope.results import Result

    monkeypatch.setenv("MECHSCOPE_OUT", str(tmp_path / "out"))
    result = Result(tensors={"x": torch.ones(2)}, axes={"x": ("i",)})
    calls: list[str] = []

    def call(model: str) -> Result:
        calls.append(model)
        return result

    for _ in range(2):
        hm, got, path = run_verb(
            "m",
            call,
            out=None,
            default_name="r.safetensors",
            load=lambda name: name + "!",
            summary=lambda r, m: ["sum 2"],
        )
        assert hm == "m!" and got is result and path.exists()
    assert calls == ["m!", "m!"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["r-1.safetensors", "r.safetensors"]
    printed = capsys.readouterr().out
    assert printed.count("sum 2\nresult -> ") == 2


def test_run_verb_turns_foreseeable_errors_into_one_line_and_saves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MECHSCOPE_OUT", str(tmp_path / "out"))

    def call(model: str) -> None:
        raise ConfigError("expected a prompt; got nothing")

    with pytest.raises(typer.Exit) as exit_info:
        run_verb("m", call, out=None, default_name="r.safetensors", load=lambda name: name)
    assert exit_info.value.exit_code == 2
    assert "error: expected a prompt; got nothing" in capsys.readouterr().err
    assert not Path(tmp_path / "out" / "r.safetensors").exists()


CONVERTED = (
    (("locate", "heads"), "mechscope.locate.heads:HeadDetectorConfig", ()),
    (("locate", "trace"), "mechscope.locate.causal_tracing:TracingConfig", ()),
    (("locate", "ig"), "mechscope.locate.attribution:IGConfig", ()),
    (("locate", "atp"), "mechscope.locate.attribution_patching:AtPConfig", ()),
    (("locate", "probe"), "mechscope.locate.probes:ProbeConfig", ()),
    (("locate", "tuned-lens-train"), "mechscope.locate.tuned_lens:TunedLensConfig", ()),
    (("locate", "eap"), "mechscope.locate.circuits.eap:EAPConfig", ("steps",)),
    (("locate", "eap-ig"), "mechscope.locate.circuits.eap:EAPConfig", ()),
    (("edit", "rome"), "mechscope.steer.editing.rome:ROMEConfig", ("stats",)),
    (("edit", "memit"), "mechscope.steer.editing.memit:MEMITConfig", ("stats", "layers")),
    (("diff",), "mechscope.improve.diffing.diff:DiffConfig", ("progress",)),
    (("features", "train"), "mechscope.features.train:SAETrainConfig", ()),
    (("features", "train-store"), "mechscope.features.train:SAETrainConfig", ()),
    (("detect", "train"), "mechscope.improve.detect.detectors:DetectorConfig", ("shrinkage", "sites")),
    (
        ("steer", "direction"),
        "mechscope.steer.selection:DirectionSelectionConfig",
        ("layers", "positions", "site", "require_induction"),
    ),
)


@pytest.mark.parametrize(("command", "config", "own"), CONVERTED)
def test_the_converted_commands_take_every_field_of_their_config(command, config, own):
    """A field added to a converted verb's config is on its command line with no CLI edit."""
    import importlib
    from dataclasses import fields

    from mechscope.cli.main import app

    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    helped = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "240"}).output
    for f in fields(cls):
        if f.name not in own:  # fields the command builds from its own options
            assert "--" + f.name.replace("_", "-") in helped, (command, f.name)
