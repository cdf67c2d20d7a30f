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
    """The schema of what the YAML reader (:mod:`gnnspec.syntax.yaml_front`) accepts: top-level
    scalars as the IR types them or as expression text; ``model`` and ``plan`` as expression text
    only (``model`` also as a non-empty list of stage texts: the reader takes no stage or plan
    mappings); ``graph`` and ``train`` as mappings whose values may also be expression text (PyYAML
    reads ``1e-3`` and ``none`` as strings), or as text."""
    schema = ir.Spec.model_json_schema(by_alias=True)
    properties = schema["properties"]
    defs = schema["$defs"]
    for key, prop in list(properties.items()):
        if key == "model":
            properties[key] = {
                "description": "the pipeline: `linear >> rev(depth=8, op=gat) >> linear`, or a list of stages",
                "anyOf": [
                    {"type": "string", "examples": ["linear >> rev(groups=2, depth=1001, op=gat, tie=true) >> linear"]},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1},
                ],
            }
        elif key == "plan":
            properties[key] = {**_EXPRESSION, "examples": ["reversible", "checkpoint(segments=4)", "auto(budget=16GiB)"]}
        elif key in ("graph", "train"):
            model = defs[key.capitalize()]
            # numbers and `none` may come as text (PyYAML reads `1e-3` as a string); an enumeration
            # keeps its values, so an editor still flags `optimizer: adamm`
            mapping = {**model, "properties": {name: value if "enum" in value else {"anyOf": [value, _EXPRESSION]}
                                               for name, value in model["properties"].items()}}
            properties[key] = {"anyOf": [mapping, _EXPRESSION], "title": key.capitalize()}
        elif "enum" in prop:
            properties[key] = prop
        else:
            properties[key] = {"anyOf": [prop, _EXPRESSION], **({"title": prop["title"]} if "title" in prop else {})}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "gnnspec spec (YAML form)"
    schema["description"] = (
        "A deep GNN spec: the keys of a .gnn file as a YAML mapping. String values are parsed with "
        "the expression grammar; graph and train may be mappings."
    )
    schema["required"] = ["model"]
    return schema
