"""Reading the small JSON files a user hands us (config.json, index, manifest) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exporter.errors import UserError


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a JSON object")
    return doc
