"""The configuration reference (docs/configuration.md), generated from the settings class."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from worker.settings import WorkerSettings

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
CONFIG_DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        try:
            value: Any = field.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return ""
        if isinstance(value, BaseModel):
            return ""
        if isinstance(value, str) and "-" in value and value.split("-")[-1].isdigit():
            return "*host-pid*"
    else:
        value = field.default
    if value is PydanticUndefined or value is None:
        return ""
    if isinstance(value, list):
        return ",".join(map(str, value)) or ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"`{value}`"


def _rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(_rows(annotation, f"{prefix}{name.upper()}__"))
            continue
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append((f"`{prefix}{name.upper()}`", _default(field), description))
    return rows


def config_reference() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| {v} | {d} | {m} |" for v, d, m in _rows(WorkerSettings, "EMOWORKER_")]
    return "\n".join(lines) + "\n"


def with_reference(text: str) -> str:
    """``text`` (a markdown page) with the block between the markers regenerated."""
    block = f"{START}\n{config_reference()}{END}"
    if START not in text or END not in text:
        raise ValueError(f"the page has no {START} ... {END} block")
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)


def main() -> None:
    """Rewrite the configuration reference in docs/configuration.md (``make docs``)."""
    text = CONFIG_DOC.read_text(encoding="utf-8")
    updated = with_reference(text)
    if updated == text:
        print(f"the configuration reference in {CONFIG_DOC} is up to date")
        return
    CONFIG_DOC.write_text(updated, encoding="utf-8")
    print(f"updated the configuration reference in {CONFIG_DOC}")


if __name__ == "__main__":
    main()
