"""One way to turn a verb into a command: options generated from its config dataclass, one run helper.

Every verb follows one signature rule (``docs/architecture.md``): positional data arguments, a frozen
config dataclass for the knobs that change the answer, keyword-only runtime knobs (progress, chunk
sizes). The CLI mirrors it:

- :func:`config_options` adds one ``--option`` per config field to a command -- name, type, default and
  help text read from the dataclass and its docstring -- and hands the command a built, validated config.
  A new knob on a config appears on the command line with no CLI edit; an invalid value is the config's
  own :class:`~mechscope.errors.ConfigError`, printed as one line with exit code 2.
- :func:`run_verb` is the body every result-writing command shares: load the model, call the verb, save
  the result (never over a file the user did not name), write the optional HTML figure, print the
  summary and where the result went. Foreseeable errors become one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from mechscope.cli.common import fail, offline_by_default, output_path, write_figure

F = TypeVar("F", bound=Callable[..., Any])

#: Scalar field types an option can carry as it is.
_SCALARS = (int, float, str, bool)


def field_help(config_cls: type) -> dict[str, str]:
    """Field name -> help text, from the ``Args:`` / ``Attributes:`` section of the config's docstring.

    Entries are ``name: text`` (continued on more-indented lines); ``a, b: text`` documents two fields."""
    doc = inspect.getdoc(config_cls) or ""
    out: dict[str, str] = {}
    in_section, current, indent = False, None, 0
    for line in doc.splitlines():
        if re.match(r"^(Args|Attributes|Fields):\s*$", line):
            in_section, current = True, None
            continue
        if not in_section:
            continue
        if line and not line[0].isspace():
            in_section, current = False, None
            continue
        match = re.match(r"^(\s+)([A-Za-z_][\w, ]*):\s*(.*)$", line)
        if match and (current is None or len(match.group(1)) <= indent):
            indent = len(match.group(1))
            current = [name.strip() for name in match.group(2).split(",")]
            for name in current:
                out[name] = match.group(3).strip()
        elif current is not None and line.strip():
            for name in current:
                out[name] = f"{out[name]} {line.strip()}".strip()
    return {name: _plain(text) for name, text in out.items()}


def _plain(text: str) -> str:
    """Docstring markup -> terminal text (``x`` and :func:`x` -> x)."""
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    text = re.sub(r"``([\"'][^`]*[\"'])``", r"\1", text)  # ``"probe"`` -> "probe"
    return text.replace("``", "'")


def _option_type(annotation: Any, owner: str, name: str) -> tuple[Any, bool]:
    """(the type an option parses to, whether it is a tuple field given as a repeatable option)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation in _SCALARS:
        return annotation, False
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        if inner in _SCALARS:
            return inner | None, False
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _SCALARS:
        return list[args[0]], True  # type: ignore[valid-type]
    if origin is typing.Literal and all(isinstance(a, str) for a in args):
        return str, False
    raise TypeError(
        f"{owner}.{name}: a field of type {annotation!r} has no command-line form; exclude it from "
        "config_options or give the command its own option for it"
    )


def config_options(
    config_cls: type,
    *,
    param: str = "config",
    exclude: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    helps: Mapping[str, str] | None = None,
    names: Mapping[str, tuple[str, ...]] | None = None,
) -> Callable[[F], F]:
    """Decorate a command whose parameter `param` is a `config_cls`: the command instead takes one option
    per field (``--field-name``), and receives ``config_cls(**values)``.

    `exclude` leaves fields at the config's defaults (e.g. nested configs, or fields the command sets from
    its own options); `defaults` overrides a field's command-line default; `helps` overrides or adds help
    text (otherwise read from the config's docstring); `names` gives a field its own option names (e.g.
    ``{"sites": ("--site", "-s")}`` where the command line has always used the singular). Fields whose type
    has no command-line form must be
    excluded: the decorator refuses them when the command is defined, not when a user runs it.
    """
    if not (dataclasses.is_dataclass(config_cls) and isinstance(config_cls, type)):
        raise TypeError(f"config_options needs a dataclass type; got {config_cls!r}")
    skipped = set(exclude)
    unknown = skipped - {f.name for f in dataclasses.fields(config_cls)}
    if unknown:
        raise TypeError(f"{config_cls.__name__} has no field(s) {sorted(unknown)} to exclude")
    hints = typing.get_type_hints(config_cls)
    texts = {**field_help(config_cls), **(helps or {})}
    chosen = [f for f in dataclasses.fields(config_cls) if f.name not in skipped and f.init]
    specs: list[tuple[str, Any, Any, bool]] = []
    for f in chosen:
        kind, repeated = _option_type(hints[f.name], config_cls.__name__, f.name)
        if defaults and f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"{config_cls.__name__}.{f.name} has no default; give it through `defaults`")
        specs.append((f.name, kind, list(default) if repeated else default, repeated))

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        if param not in signature.parameters:
            raise TypeError(f"{command.__name__} has no parameter {param!r} to fill with a {config_cls.__name__}")
        taken = set(signature.parameters) - {param}
        clash = [name for name, *_ in specs if name in taken]
        if clash:
            raise TypeError(f"{command.__name__}: option(s) {clash} come both from the command and its config")
        generated = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[
                    kind, typer.Option(*(names or {}).get(name, ()), help=texts.get(name, ""), show_default=True)
                ],
                default=default,
            )
            for name, kind, default, _ in specs
        ]
        kept = [p for p in signature.parameters.values() if p.name != param]
        positional = [p for p in kept if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in kept if p not in positional]
        new_signature = signature.replace(parameters=[*positional, *generated, *keyword])

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from mechscope.errors import MechscopeError

            values = {name: kwargs.pop(name) for name, *_ in specs}
            for name, _, _, repeated in specs:
                if repeated:
                    values[name] = tuple(values[name])
            try:
                kwargs[param] = config_cls(**values)
            except (MechscopeError, ValueError, TypeError) as exc:
                raise fail(exc) from exc
            return command(*args, **kwargs)

        wrapper.__signature__ = new_signature  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in new_signature.parameters.values()}
        del wrapper.__wrapped__  # type: ignore[attr-defined]  # typer must read the new signature, not the command's
        return typing.cast(F, wrapper)

    return decorate


def run_verb(
    model: str,
    call: Callable[[Any], Any],
    *,
    out: Path | None,
    default_name: str,
    html: Path | None = None,
    figure: Callable[[Any], Any] | None = None,
    summary: Callable[[Any, Any], Iterable[str]] | None = None,
    load: Callable[[str], Any] | None = None,
) -> tuple[Any, Any, Path]:
    """Load `model`, run ``call(model)``, save its result, write the figure, print the summary; the shared
    body of every command that writes a result.

    The result goes to `out` or to `default_name` in the output folder (never over an existing file the
    user did not name). With `html`, ``figure(result)`` (default ``result.plot()``) is written there.
    `summary(result, model)` yields the lines printed before ``result -> PATH``. Returns (model, result, path) for
    commands that go on. Foreseeable errors (:class:`~mechscope.errors.MechscopeError`, ``ValueError``,
    ``OSError``) print one line and exit with code 2; nothing is saved for a failed call.
    """
    offline_by_default()
    from mechscope.errors import MechscopeError

    try:
        if load is None:
            from mechscope.cli.common import load_model

            load = load_model
        hm = load(model)
        result = call(hm)
        path = result.save(output_path(out, default_name))
        if html is not None:
            write_figure(figure(result) if figure is not None else result.plot(), html)
    except (MechscopeError, ValueError, OSError) as exc:
        raise fail(exc) from exc
    for line in summary(result, hm) if summary is not None else ():
        typer.echo(line)
    typer.echo(f"result -> {path}" + (f", figure -> {html}" if html is not None else ""))
    return hm, result, Path(path)


__all__ = ["config_options", "field_help", "run_verb"]
