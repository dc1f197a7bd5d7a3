"""The checked-in docs/openapi.json is what the app serves; regenerate it with
``python -m services.gateway.openapi`` after changing the API."""

from __future__ import annotations

import json

from services.gateway.openapi import DEFAULT_PATH, document


def test_checked_in_openapi_matches_the_app() -> None:
    assert DEFAULT_PATH.exists(), "run: python -m services.gateway.openapi"
    checked_in = json.loads(DEFAULT_PATH.read_text())
    assert checked_in == document(), (
        "docs/openapi.json drifted from the gateway; run: python -m services.gateway.openapi")


def test_every_operation_is_authenticated_and_documents_its_errors() -> None:
    doc = document()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert operation.get("security") == [{"HTTPBearer": []}], (method, path)
            errors = {s for s in operation["responses"] if s.startswith(("4", "5"))}
            assert {"401", "403", "429"} <= errors, (method, path)
            for status in errors:
                schema = operation["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path)
    assert "HTTPValidationError" not in doc["components"]["schemas"]
