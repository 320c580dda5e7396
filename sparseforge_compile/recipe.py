"""Recipe files for ``prune --recipe``: a whole ``SparsifyConfig`` in TOML (YAML where ``yaml`` imports).

Laid out as the configs are: the top-level keys of :class:`~.pipeline.SparsifyConfig`, then one table
per nested training config (``[schedule]``, ``[loss]``, ``[evidence]``, ``[runtime]``). An unknown
key or a bad value is a one-line :class:`~.errors.RecipeError` naming the file and the key. An unset
optional setting is left out (TOML has no null) or written ``"none"``.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path
from typing import Any

import tomllib

from .anneal.config import SECTIONS, AnnealConfig, field_docs, flat_fields, section_of
from .config import SparsifyConfig
from .errors import RecipeError


def top_fields() -> dict[str, dataclasses.Field]:
    """SparsifyConfig's own settings (all but the nested training config)."""
    return {f.name: f for f in dataclasses.fields(SparsifyConfig) if f.name != "anneal"}


def setting_docs() -> dict[str, str]:
    """Every setting's help text, by its flat name."""
    return {**field_docs(SparsifyConfig), **{k: v for cls in SECTIONS.values() for k, v in field_docs(cls).items()}}


def _coerce(where: str, key: str, value: Any, kind: str) -> Any:
    """``value`` as the field's type (its annotation string ``kind``), or a RecipeError naming ``key``."""
    optional = "None" in kind
    if value is None or (optional and isinstance(value, str) and value.lower() == "none"):
        if optional:
            return None
        raise RecipeError(f"{where}: {key} must be set (it has no 'none')")
    if kind.startswith("tuple"):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise RecipeError(f"{where}: {key} = {value!r}: expected a list of strings")
    if "bool" in kind:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: {key} = {value!r}: expected true or false")
    if "int" in kind and "float" not in kind:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if "str" in kind and isinstance(value, str):  # a number or a word (batch_size: auto)
            return int(value) if value.isdigit() else value
        raise RecipeError(f"{where}: {key} = {value!r}: expected an integer")
    if "float" in kind:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise RecipeError(f"{where}: {key} = {value!r}: expected a number")
    if isinstance(value, str):
        return value
    raise RecipeError(f"{where}: {key} = {value!r}: expected a string")


def _parse(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise RecipeError(f"{path}: YAML recipes need PyYAML (pip install pyyaml); or write it as TOML") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"{path}: not valid TOML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a table of settings, got {type(data).__name__}")
    return data


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe's settings by flat name (SparsifyConfig's and the nested training configs'), typed."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    data, top, flat = _parse(path), top_fields(), flat_fields()
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise RecipeError(f"{path}: [{key}] must be a table of settings")
            names = {f.name for f in dataclasses.fields(SECTIONS[key])}
            for name, v in value.items():
                if name not in names:
                    raise RecipeError(f"{path}: unknown key {key}.{name}" + _hint(name, key))
                out[name] = _coerce(str(path), f"{key}.{name}", v, str(flat[name].type))
        elif key in top:
            out[key] = _coerce(str(path), key, value, str(top[key].type))
        else:
            raise RecipeError(f"{path}: unknown key {key}" + _hint(key, None))
    return out


def _hint(name: str, section: str | None) -> str:
    """Where a misplaced key belongs, if it is a setting at all."""
    flat = flat_fields()
    if name in flat:
        return f" (it belongs in [{section_of()[name]}])"
    if section is not None and name in top_fields():
        return " (it is a top-level key, above the tables)"
    return f"; the keys are {', '.join(top_fields())} and the tables [{'], ['.join(SECTIONS)}]"


def build_config(values: dict[str, Any], source: str = "settings") -> SparsifyConfig:
    """A SparsifyConfig from flat settings; a value its config rejects is a RecipeError naming ``source``."""
    top = top_fields()
    try:
        anneal = AnnealConfig.from_flat({k: v for k, v in values.items() if k not in top})
        return SparsifyConfig(**{k: v for k, v in values.items() if k in top}, anneal=anneal)
    except ValueError as exc:
        raise RecipeError(f"{source}: {exc}") from exc


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return json.dumps(list(value))
    return json.dumps(value)


def render_recipe(cfg: SparsifyConfig) -> str:
    """``cfg`` as a recipe file (TOML) that :func:`read_recipe` reads back to an equal config."""
    docs = setting_docs()
    lines = [f"# sparseforge-compile prune recipe, method {cfg.method}: read with --recipe FILE; flags given",
             "# on the command line override it. Unset settings are commented out.", ""]

    def emit(f: dataclasses.Field, value: Any) -> None:
        lines.extend(textwrap.wrap(docs.get(f.name, ""), 100, initial_indent="# ", subsequent_indent="# "))
        if value is None:  # TOML has no null: unset where that is the default, else "none"
            lines.append(f"# {f.name} =" if f.default is None else f'{f.name} = "none"')
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")

    for f in top_fields().values():
        emit(f, getattr(cfg, f.name))
    for section, cls in SECTIONS.items():
        lines += ["", f"[{section}]"]
        for f in dataclasses.fields(cls):
            emit(f, getattr(getattr(cfg.anneal, section), f.name))
    return "\n".join(lines) + "\n"
