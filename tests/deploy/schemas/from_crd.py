"""Turn one version of a CustomResourceDefinition into the strict JSON schema tests/deploy validates with.

    python tests/deploy/schemas/from_crd.py CRD.yaml VERSION SOURCE > tests/deploy/schemas/KIND-VERSION.json

kubernetes-validate has no schema for custom kinds, so the CRD's own ``openAPIV3Schema`` is kept here:
descriptions and ``status`` dropped (size; manifests never set status), and every object that lists
its properties refuses unknown keys, as the API server's strict field validation does (it prunes
them otherwise, silently: the typo we want to catch). CEL rules (``x-kubernetes-validations``) are
not checked offline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def strict(node: Any) -> Any:
    """The schema without descriptions, closed wherever it names its properties."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict(value) for key, value in node.items() if key != "description"}
    closed = "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and node.get("type") == "object" and not closed:
        out["additionalProperties"] = False
    return out


def crd_schema(crd: dict[str, Any], version: str, source: str) -> dict[str, Any]:
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = dict(served["schema"]["openAPIV3Schema"])
    properties = dict(schema["properties"])
    properties.pop("status", None)
    properties["metadata"] = {"type": "object"}  # checked by kubernetes-validate's ObjectMeta elsewhere
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    properties["apiVersion"] = {"const": f"{group}/{version}"}
    properties["kind"] = {"const": kind}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"{group}/{version} {kind}: the openAPIV3Schema of {source}, made strict by"
        " tests/deploy/schemas/from_crd.py (unknown keys are errors).",
        **strict({**schema, "properties": properties}),
        "required": ["apiVersion", "kind", "metadata", "spec"],
    }


if __name__ == "__main__":
    path, version, source = sys.argv[1:4]
    print(json.dumps(crd_schema(yaml.safe_load(Path(path).read_text()), version, source), indent=1))
