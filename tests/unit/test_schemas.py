"""The committed JSON Schemas are current, and they accept and reject what the models do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import schemas
from schemas import SocialPost

GOOD_POST: dict[str, Any] = {
    "schema_version": "1.0",
    "id": "p1",
    "text": "What a lovely day!",
    "author": "u/someone",
    "platform": "reddit",
    "created_at": "2024-01-02T03:04:05Z",
    "lang": "en",
    "metadata": {"thread": "abc"},
}


@pytest.mark.parametrize("name", list(schemas.EVENT_MODELS))
def test_committed_schema_is_current(name: str) -> None:
    path = schemas.schema_path(name)
    assert path.is_file(), f"{path} is missing: run `emoworker schema --write`"
    committed = path.read_text(encoding="utf-8")
    assert committed == schemas.schema_text(name), (
        f"{path.name} is stale (the model changed): run `emoworker schema --write` and commit it"
    )


def test_every_committed_schema_file_belongs_to_a_model() -> None:
    files = {p.name for p in schemas.SCHEMA_DIR.glob("*.schema.json")}
    assert files == {f"{name}.schema.json" for name in schemas.EVENT_MODELS}


@pytest.mark.parametrize("name", list(schemas.EVENT_MODELS))
def test_schema_metadata(name: str) -> None:
    schema = json.loads(schemas.schema_text(name))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(f"/{name}.schema.json")
    assert schema["x-schema-version"] == schemas.SCHEMA_VERSION
    assert schema["type"] == "object"


def test_write_json_schemas_writes_what_schema_text_returns(tmp_path: Path) -> None:
    paths = schemas.write_json_schemas(tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"{n}.schema.json" for n in schemas.EVENT_MODELS)
    for name in schemas.EVENT_MODELS:
        assert schemas.schema_path(name, tmp_path).read_text() == schemas.schema_text(name)


def test_social_post_schema_requires_id_and_text_and_allows_extra_fields() -> None:
    schema = schemas.json_schema("social_post")
    assert sorted(schema["required"]) == ["id", "text"]
    assert schema.get("additionalProperties", True) is not False
    assert schema["properties"]["id"]["minLength"] == 1
    assert schema["properties"]["text"]["type"] == "string"


def test_unknown_fields_keep_a_social_post_valid() -> None:
    post = SocialPost.model_validate({**GOOD_POST, "subreddit": "r/test", "score": 3})
    assert post.model_extra == {"subreddit": "r/test", "score": 3}
    assert post.model_dump(mode="json")["subreddit"] == "r/test"


def test_social_post_without_text_is_invalid() -> None:
    from pydantic import ValidationError

    document = {k: v for k, v in GOOD_POST.items() if k != "text"}
    with pytest.raises(ValidationError) as info:
        SocialPost.model_validate(document)
    assert info.value.errors()[0]["type"] == "missing"
    assert info.value.errors()[0]["loc"] == ("text",)


@pytest.fixture(scope="module")
def social_post_validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(schemas.schema_path("social_post").read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_json_schema_validates_a_good_post(social_post_validator: Any) -> None:
    assert list(social_post_validator.iter_errors(GOOD_POST)) == []
    assert list(social_post_validator.iter_errors({"id": "p1", "text": "hi"})) == []


def test_json_schema_accepts_unknown_fields(social_post_validator: Any) -> None:
    errors = list(social_post_validator.iter_errors({**GOOD_POST, "subreddit": "r/test"}))
    assert errors == []


def test_json_schema_rejects_a_post_without_text(social_post_validator: Any) -> None:
    document = {k: v for k, v in GOOD_POST.items() if k != "text"}
    errors = list(social_post_validator.iter_errors(document))
    assert len(errors) == 1
    assert "'text' is a required property" in errors[0].message


def test_json_schema_rejects_a_non_string_id(social_post_validator: Any) -> None:
    errors = list(social_post_validator.iter_errors({**GOOD_POST, "id": 5}))
    assert [list(e.path) for e in errors] == [["id"]]
