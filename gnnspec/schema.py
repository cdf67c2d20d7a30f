"""The JSON Schema of the YAML form of a spec, for editor completion (`gnnspec schema`).

It is the IR's schema (the same pydantic models the parser fills) with the YAML form's
shorthands: every top-level value may also be written as a string in the expression language,
and `model` as a list of stage strings.
"""

from __future__ import annotations

from typing import Any

from gnnspec import ir

_EXPRESSION = {"type": "string", "description": "a value in the gnnspec expression language"}


def yaml_form_schema() -> dict[str, Any]:
    schema = ir.Spec.model_json_schema(by_alias=True)
    properties = schema["properties"]
    for key, prop in list(properties.items()):
        if key == "model":
            properties[key] = {
                "description": "the pipeline: `linear >> rev(depth=8, op=gat) >> linear`, or a list of stages",
                "anyOf": [
                    {"type": "string", "examples": ["linear >> rev(groups=2, depth=1001, op=gat, tie=true) >> linear"]},
                    {"type": "array", "items": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/Stage"}]}},
                    prop,
                ],
            }
        else:
            properties[key] = {"anyOf": [prop, _EXPRESSION], **({"title": prop["title"]} if "title" in prop else {})}
    schema["$defs"]["Stage"] = {"oneOf": [{"$ref": f"#/$defs/{m.__name__}"} for m in ir.STAGE_MODELS.values()]}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "gnnspec spec (YAML form)"
    schema["description"] = (
        "A deep GNN spec: the keys of a .gnn file as a YAML mapping. String values are parsed with "
        "the expression grammar; graph and train may be mappings."
    )
    schema["required"] = ["model"]
    return schema
