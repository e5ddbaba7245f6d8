# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Checks of a ``python -m monai.bundle run`` command line against the configs it names, before any work.

MONAI's runner accepts any ``--<id> <value>`` and adds an id the configs do not define, so a typo such as
``--epoch 3`` is silently ignored (training runs its 100 epochs), and an unknown run id fails only after the
workflow was initialised, without naming the run ids the configs define; and ``--resume false`` reaches the config
as the text ``'false'``, which is true. :func:`check_command_line` (the first expression of each config's
``initialize`` list) refuses all three, naming the closest known id or the spelling that works (``False``). It
reads the command line as MONAI's runner (python-fire) does; in any other process (a test, MONAI Label,
``monai.bundle.run`` called from Python) it checks nothing.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle import scripts as bundle_scripts
from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

__all__ = ["CommandLineError", "check_command_line", "parse_run_command"]

# the arguments of `monai.bundle run` itself, in positional order; every other --<name> is a config override
RUN_ARGUMENTS = tuple(
    name
    for name, parameter in inspect.signature(bundle_scripts.run).parameters.items()
    if parameter.kind is not inspect.Parameter.VAR_KEYWORD
)
_RUNNER = os.path.join("monai", "bundle", "__main__.py")
_NOT_WORKFLOWS = ("imports", "initialize", "finalize")


class CommandLineError(ValueError):
    """An id or run id of the command line that the configs do not define; the message names the closest known."""


def _is_flag(token: str) -> bool:
    return token.startswith("--") or re.match(r"-[a-zA-Z]", token) is not None  # as python-fire: not "-1"


def parse_run_command(argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Split a ``python -m monai.bundle run`` command line into the runner's own arguments and config overrides.

    Tokens are read as python-fire reads them for ``monai.bundle.scripts.run``: ``--name value``, ``--name=value``
    or a bare ``--name`` (True); hyphens in names become underscores; other tokens fill ``run_id``, ``init_id``...
    in order; a bare ``--`` ends the arguments. Values are parsed as python-fire does (``"['a.json','b.json']"`` is
    a list). The defaults of an ``--args_file`` apply where the command line gives no value.

    Args:
        argv: the process's arguments, ``sys.argv`` form (program first).

    Returns:
        ``(run_arguments, overrides)``, or None when ``argv`` is not a ``monai.bundle run`` command line.
    """
    if len(argv) < 2 or not os.path.normpath(argv[0]).endswith(_RUNNER) or argv[1] != "run":
        return None
    # MONAI's runner needs python-fire, so it is there whenever this is a runner's command line; other processes
    # (MONAI Label, the Model Zoo's unit tests, ConfigWorkflow from Python) need not have it
    from fire.parser import DefaultParseValue

    tokens = list(argv[2:])
    if "--" in tokens:
        tokens = tokens[: tokens.index("--")]
    named: dict[str, Any] = {}
    positional: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if not _is_flag(token):
            positional.append(token)
            continue
        key, has_value, value = token.lstrip("-").partition("=")
        if not has_value:
            value = "True"
            if index < len(tokens) and not _is_flag(tokens[index]):
                value, index = tokens[index], index + 1
        named[key.replace("-", "_")] = DefaultParseValue(value)
    named.update(zip(RUN_ARGUMENTS, map(DefaultParseValue, positional)))
    if named.get("args_file"):
        named = {**ConfigParser.load_config_file(named["args_file"]), **named}
    run_arguments = {k: v for k, v in named.items() if k in RUN_ARGUMENTS}
    overrides = {k: v for k, v in named.items() if k not in RUN_ARGUMENTS}
    return run_arguments, overrides


def _workflow_ids(config_file: Any) -> list[str]:
    """Top-level ids that are lists of expressions (``run``, ``evaluating``) or refer to one (``"$@run"``), sorted."""
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.resolve_macro_and_relative_ids()
    config = parser.get()
    workflows = {
        k
        for k, v in config.items()
        if k not in _NOT_WORKFLOWS and isinstance(v, list) and v and all(str(e).startswith("$") for e in v)
    }
    aliases = {k: v[2:] for k, v in config.items() if isinstance(v, str) and v.startswith("$@")}
    while new := {k for k, target in aliases.items() if target in workflows and k not in workflows}:
        workflows |= new
    return sorted(workflows)


def _check_boolean(key: str, value: Any, default: Any) -> None:
    """Refuse ``--<flag> false`` for a boolean id: python-fire passes the string ``'false'``, which is truthy."""
    if isinstance(default, bool) and isinstance(value, str) and value.lower() in ("true", "false"):
        raise CommandLineError(
            f"--{key} {value}: the command line passes the text {value!r}, which is not a boolean (any text is "
            f"true); write --{key} {value.capitalize()}."
        )


def _closest(name: str, known: Sequence[str]) -> str:
    matches = difflib.get_close_matches(name, known, n=1)
    if matches:
        return f"did you mean --{matches[0]}?"
    return f"the ids defined: {', '.join(sorted(k for k in known if not k.startswith('_')))}."


def check_command_line(argv: Sequence[str] | None = None) -> None:
    """Refuse a command line that names an id or a run id its configs do not define, before any work.

    Only the top-level part of an override is checked (``--network_def#channels`` needs ``network_def``). Besides
    the configs' ids, ``_meta_`` and, with ``--tracking``, the ids of MONAI's experiment-tracking settings are known.

    Args:
        argv: the process's arguments; None for ``sys.argv``. Nothing is checked unless they are a
            ``python -m monai.bundle run`` command line naming a ``--config_file``.

    Raises:
        CommandLineError: naming the unknown id and the closest known one, or the unknown run id and the
            workflows the configs define.
    """
    parsed = parse_run_command(sys.argv if argv is None else argv)
    if parsed is None or not parsed[0].get("config_file"):
        return
    run_arguments, overrides = parsed
    config_file = run_arguments["config_file"]
    files = ", ".join(config_file) if isinstance(config_file, (list, tuple)) else str(config_file)
    config = ConfigParser.load_config_files(config_file)
    known = set(config) | {"_meta_"}
    if run_arguments.get("tracking"):
        known |= set(DEFAULT_MLFLOW_SETTINGS["configs"])
    for key in overrides:
        head = re.split(r"::|#", key, maxsplit=1)[0]
        if head not in known:
            raise CommandLineError(
                f"unknown config id {head!r} (--{key}): not defined by {files}; {_closest(head, known)}"
            )
        _check_boolean(key, overrides[key], config.get(key))
    run_id = run_arguments.get("run_id") or "run"
    if run_id not in known:
        raise CommandLineError(
            f"run id {run_id!r} is not defined by {files}; the workflows they define: "
            f"{', '.join(_workflow_ids(config_file))} (without a run id, 'run' runs)."
        )
