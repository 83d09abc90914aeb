"""Write `.cog/openapi_schema.json` for predict.py, as `cog build` does, so the real Cog server validates inputs.

The server reads this file at start and trusts it (a stale one silently applies old rules), so the local
runner regenerates it on every start. Inputs come from the cog SDK's own introspection of the predictor;
streaming comes from the `@cog.streaming` decorator, read from the source as `cog build` reads it.
"""

import ast
import json
import sys
from pathlib import Path

from cog import _adt as adt
from cog._inspector import create_predictor

from idefics_cog.settings import ROOT

SCHEMA_PATH = Path(".cog/openapi_schema.json")


def _input_property(field: adt.InputField) -> dict:
    prop: dict = {"x-order": field.order}
    if field.choices is not None:
        prop["allOf"] = [{"$ref": f"#/components/schemas/{field.name}"}]
    else:
        prop["title"] = field.name.replace("_", " ").title()
        prop.update(field.type.json_type())
    if field.default is not None:
        prop["default"] = field.type.json_encode(field.default)
    if field.type.repetition is adt.Repetition.OPTIONAL:
        prop["nullable"] = True
    integer = prop.get("type") == "integer"
    for key, value in (("description", field.description), ("minimum", field.ge), ("maximum", field.le),
                       ("minLength", field.min_length), ("maxLength", field.max_length),
                       ("pattern", field.regex)):
        if value is not None:
            prop[key] = int(value) if integer and key in ("minimum", "maximum") else value
    return prop


def _required(field: adt.InputField) -> bool:
    return field.default is None and field.type.repetition in (adt.Repetition.REQUIRED, adt.Repetition.REPEATED)


def is_streaming(source: Path, class_name: str, method: str) -> bool:
    """True when `class_name.method` in `source` is decorated with `@cog.streaming` (or `@streaming`)."""
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    return any(ast.unparse(d) in ("cog.streaming", "streaming") for d in item.decorator_list)
    return False


def _route(summary: str, operation: str, request: str, response: str) -> dict:
    def body(name: str) -> dict:
        return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

    return {"post": {"summary": summary, "operationId": operation, "requestBody": body(request),
                     "responses": {"200": {"description": "Successful Response", **body(response)},
                                   "422": {"description": "Validation Error", **body("HTTPValidationError")}}}}


def build_schema(predictor: str = "predict.py:Predictor", mode: str = "predict", root: Path = ROOT) -> dict:
    """The OpenAPI document for `file.py:Name`, the file being relative to `root`."""
    file_name, class_name = predictor.split(":")
    source = root / file_name
    module = source.stem
    if str(source.parent) not in sys.path:
        sys.path.insert(0, str(source.parent))
    info = create_predictor(module, class_name)
    fields = info.inputs.values()
    train = mode == "train"
    noun = "Training" if train else "Prediction"
    route = "/trainings" if train else "/predictions"
    main = _route("Train" if train else "Predict", f"{mode}_{route.strip('/')}_post", f"{noun}Request",
                  f"{noun}Response")
    if not train and is_streaming(source, class_name, "predict"):
        main["post"]["x-cog-streaming"] = True
    input_schema = {"title": "Input", "type": "object",
                    "properties": {f.name: _input_property(f) for f in fields}}
    required = [f.name for f in fields if _required(f)]
    if required:
        input_schema["required"] = required
    string = {"type": "string"}
    response_fields = {"input": {"$ref": "#/components/schemas/Input"},
                       "output": {"$ref": "#/components/schemas/Output"},
                       **{k: string for k in ("id", "version", "status", "error", "logs")},
                       **{k: {**string, "format": "date-time"} for k in ("created_at", "started_at",
                                                                          "completed_at")},
                       "metrics": {"type": "object"}}
    schemas = {
        "Input": input_schema,
        "Output": info.output.json_type(),
        f"{noun}Request": {"title": f"{noun}Request", "type": "object",
                           "properties": {"id": string, "input": {"$ref": "#/components/schemas/Input"}}},
        f"{noun}Response": {"title": f"{noun}Response", "type": "object", "properties": response_fields},
        "HTTPValidationError": {"title": "HTTPValidationError", "type": "object", "properties": {
            "detail": {"type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}}}},
        "ValidationError": {"title": "ValidationError", "type": "object", "required": ["loc", "msg", "type"],
                            "properties": {"loc": {"type": "array", "items": {"anyOf": [string, {"type": "integer"}]}},
                                           "msg": string, "type": string}},
        **{f.name: {"title": f.name, "description": "An enumeration.", "enum": f.choices,
                    **f.type.primitive.json_type()} for f in fields if f.choices is not None},
    }
    return {"openapi": "3.0.2", "info": {"title": "Cog", "version": "0.1.0"},
            "paths": {route: main}, "components": {"schemas": schemas}}


def write_schema(predictor: str = "predict.py:Predictor", mode: str = "predict", root: Path = ROOT) -> Path:
    """Write `root/.cog/openapi_schema.json`, where the Cog server started in `root` reads it."""
    path = root / SCHEMA_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_schema(predictor, mode, root), indent=2) + "\n")
    return path


if __name__ == "__main__":
    print(write_schema(*sys.argv[1:]))
