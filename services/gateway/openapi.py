"""Write the gateway's OpenAPI document: ``python -m services.gateway.openapi [path]``.

The default path is ``docs/openapi.json``; tests/component/gateway/test_openapi.py fails when
the checked-in file and the app drift.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .app import create_app
from .settings import GatewaySettings

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def document() -> dict[str, Any]:
    """The OpenAPI document of an app with default settings (environment ignored)."""
    settings = GatewaySettings.model_construct(**{
        name: field.default for name, field in GatewaySettings.model_fields.items()})
    return create_app(settings).openapi()


def render() -> str:
    return json.dumps(document(), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
