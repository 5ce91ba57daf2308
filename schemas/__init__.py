"""Event models of emotion-stream and their JSON Schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas.events import (
    EVENT_MODELS,
    SCHEMA_VERSION,
    BundleRelease,
    CompactEnrichedPost,
    DeadLetter,
    DeadLetterError,
    DeadLetterKind,
    DeadLetterPayload,
    EmotionColumns,
    EmotionScore,
    EnrichedPost,
    FileSource,
    FinalPost,
    KafkaSource,
    ModelInfo,
    ModelRollout,
    OodSignals,
    OodSummary,
    RecordHeader,
    ReviewReason,
    ReviewRequest,
    ReviewVerdict,
    SocialPost,
    UncertaintySummary,
)

SCHEMA_DIR = Path(__file__).resolve().parent


def json_schema(name: str) -> dict[str, Any]:
    schema = EVENT_MODELS[name].model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://emotion-stream.dev/schemas/{name}.schema.json"
    schema["x-schema-version"] = SCHEMA_VERSION
    return schema


def schema_text(name: str) -> str:
    return json.dumps(json_schema(name), indent=2, sort_keys=True) + "\n"


def schema_path(name: str, directory: Path = SCHEMA_DIR) -> Path:
    return directory / f"{name}.schema.json"


def write_json_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write one ``<name>.schema.json`` per event model; returns the paths written."""
    paths = []
    for name in EVENT_MODELS:
        path = schema_path(name, directory)
        path.write_text(schema_text(name), encoding="utf-8")
        paths.append(path)
    return paths


__all__ = [
    "EVENT_MODELS",
    "SCHEMA_VERSION",
    "BundleRelease",
    "CompactEnrichedPost",
    "DeadLetter",
    "DeadLetterError",
    "DeadLetterKind",
    "DeadLetterPayload",
    "EmotionColumns",
    "EmotionScore",
    "EnrichedPost",
    "FileSource",
    "FinalPost",
    "KafkaSource",
    "ModelInfo",
    "ModelRollout",
    "OodSignals",
    "OodSummary",
    "RecordHeader",
    "ReviewReason",
    "ReviewRequest",
    "ReviewVerdict",
    "SocialPost",
    "UncertaintySummary",
    "json_schema",
    "schema_path",
    "schema_text",
    "write_json_schemas",
]
