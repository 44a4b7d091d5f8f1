"""Command-line flags generated from the run's configuration type: every field of ``RunConfig``
and of its ``LocalConfig`` is a flag whose default, choices and help are the field's own
(``trainer.protocol.run.opt``); ``config_from_args`` builds the config back, and the config's
own checks refuse a bad value before anything is written."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from dataclasses import MISSING, Field, fields

from hierarchy.errors import UsageError
from trainer.device.config import LocalConfig
from trainer.protocol.run import DATASET_DEFAULTS, REMEDIES, RunConfig, dataset_defaults, load_run_config

ROUNDS = ("hmoe_rounds", "flat_rounds")   # left unset, they keep a resumed or grown run's own count
UNSET_KEEPS = {name.rpartition(".")[2] for name in REMEDIES}   # label-skew settings: a run keeps them for life
PROFILED = {name for d in DATASET_DEFAULTS.values() for name in d}   # unset: the data set's own default


def flag_name(f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default(f: Field):
    return f.default_factory() if f.default is MISSING else f.default


def _add(group: argparse._ArgumentGroup, f: Field, default) -> None:
    meta, name = f.metadata, flag_name(f)
    shown = "" if default in (None, "", {}) or isinstance(default, dict) else f" (default: {default})"
    own = [f"{family}: {d[f.name]}" for family, d in DATASET_DEFAULTS.items() if f.name in d]
    if own:
        shown = f" (default: {default if default not in (None, '') else 'none'}; {'; '.join(own)})"
    kw: dict = {"dest": f.name, "help": (meta["help"] + shown).replace("%", "%%")}
    if f.name in ROUNDS:
        kw.update(type=int, default=None)
    elif f.name in PROFILED:   # left unset, the data set's default (DATASET_DEFAULTS), else the field's
        kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
        kw.update(type=kind, default=None, choices=list(meta["choices"]) if meta.get("choices") else None)
    elif f.name in UNSET_KEEPS:   # left unset, a resumed run keeps its own value
        if isinstance(default, bool):
            kw.update(action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            kw.update(type=kind, default=None, choices=list(meta["choices"]) if meta.get("choices") else None)
    elif isinstance(default, bool):
        kw.update(action=argparse.BooleanOptionalAction, default=default)
    elif meta.get("parse"):
        kw.update(default=None, metavar=meta["parse"].upper())
    else:
        kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
        kw.update(type=kind, default=default)
        if meta.get("choices"):
            kw["choices"] = list(meta["choices"])
    group.add_argument(name, **kw)


def add_config_flags(p: argparse.ArgumentParser, defaults: RunConfig = RunConfig()) -> None:
    """One flag per field of ``RunConfig`` (``local`` spread into ``LocalConfig``'s fields)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(RunConfig):
        group = groups.setdefault(f.metadata["group"], p.add_argument_group(f.metadata["group"]))
        if f.name == "local":
            for lf in fields(LocalConfig):
                if not lf.metadata.get("internal"):
                    _add(group, lf, getattr(defaults.local, lf.name))
        else:
            _add(group, f, getattr(defaults, f.name))


def _parse(kind: str, text: str, name: str):
    """A structured flag's value: a fleet file, a taxonomy, an arrival rule, a list, JSON."""
    if kind == "fleet":
        from trainer.protocol.fleet import Fleet
        return Fleet.load(text).to_dict()
    if kind == "tree":
        from hierarchy.taxonomies import read_tree
        return read_tree(text).to_dict()
    if kind == "arrival":
        from trainer.grow import parse_arrival
        return parse_arrival(text, [])
    if kind == "list":
        return [item.strip() for item in text.split(",") if item.strip()]
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{name} {text[:40]!r}: expected a JSON object ({exc})") from None


def config_from_args(args: argparse.Namespace, resume: bool = False) -> RunConfig:
    """The ``RunConfig`` the flags describe. Rounds left unset take the default, or 0 on
    ``resume`` (0 keeps the saved count). Raises UsageError naming a bad flag."""
    saved = None
    out = getattr(args, "out", None)
    if resume and out and (Path(out) / "config.json").is_file():
        saved = load_run_config(Path(out))

    profile = dataset_defaults(saved.dataset if saved is not None and args.dataset is None else args.dataset)

    def value_of(f: Field, owner):
        value = getattr(args, f.name)
        if f.name in UNSET_KEEPS and value is None:   # unset: the resumed run's own, or the default
            return getattr(owner(saved), f.name) if saved is not None else _default(f)
        if f.name in PROFILED and f.name not in ROUNDS and value is None:
            return getattr(owner(saved), f.name) if saved is not None else profile.get(f.name, _default(f))
        return value

    values: dict = {}
    for f in fields(RunConfig):
        if f.name == "local":
            values["local"] = LocalConfig(**{lf.name: value_of(lf, lambda c: c.local) for lf in fields(LocalConfig)
                                             if not lf.metadata.get("internal")})
            continue
        value = value_of(f, lambda c: c)
        if f.name in ROUNDS and value is None:
            value = 0 if resume else profile.get(f.name, _default(f))
        elif f.metadata.get("parse") and value is not None:
            value = _parse(f.metadata["parse"], value, flag_name(f))
        values[f.name] = value
    if str(values["device"]).startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return RunConfig(**values)
