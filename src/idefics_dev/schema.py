"""Write `.cog/openapi_schema.json` for predict.py, as `cog build` does, so the real Cog server validates inputs.

The server reads this file once its setup is done and trusts it (a stale one silently applies old rules), so the local
runner regenerates it on every start; every server of a checkout reads the same file, so the test predictors must
give predict.py's schema (a test checks). Inputs come from the cog SDK's own introspection of the predictor;
streaming comes from the `@cog.streaming` decorator, read from the source as `cog build` reads it.
"""

import ast
import importlib
import inspect
import json
import os
import sys
import threading
from pathlib import Path

from cog import _adt as adt
from cog._inspector import create_predictor

from idefics_cog.config import ROOT

SCHEMA_PATH = Path(".cog/openapi_schema.json")


def _input_property(field: adt.InputField, enum_name: str) -> dict:
    prop: dict = {"x-order": field.order}
    if field.choices is not None:
        prop["allOf"] = [{"$ref": f"#/components/schemas/{enum_name}"}]
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


def is_streaming(cls: type, method: str) -> bool:
    """True when `cls.method` (a `def` or an `async def`, defined in `cls` or inherited) is decorated with
    `@cog.streaming` (or `@streaming`) in the source of the class that defines it."""
    owner = next((klass for klass in cls.__mro__ if method in vars(klass)), None)
    if owner is None:
        return False
    for node in ast.walk(ast.parse(Path(inspect.getsourcefile(owner)).read_text())):
        if isinstance(node, ast.ClassDef) and node.name == owner.__name__:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == method:
                    return any(ast.unparse(d) in ("cog.streaming", "streaming") for d in item.decorator_list)
    return False


def _route(summary: str, operation: str, request: str, response: str) -> dict:
    def body(name: str) -> dict:
        return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

    return {"post": {"summary": summary, "operationId": operation, "requestBody": body(request),
                     "responses": {"200": {"description": "Successful Response", **body(response)},
                                   "422": {"description": "Validation Error", **body("HTTPValidationError")}}}}


def _interface(ref: str, root: Path, train: bool) -> tuple[dict, dict]:
    """The route and the components of predict.py's predictor, or of train.py's train function."""
    file_name, name = ref.split(":")
    source = root / file_name
    if str(source.parent) not in sys.path:
        sys.path.insert(0, str(source.parent))
    info = create_predictor(source.stem, name)
    fields = list(info.inputs.values())
    # Cog's names: Input/Output and Prediction* for predict; TrainingInput/TrainingOutput and Training* for train.
    prefix, noun, route, verb = (("Training", "Training", "/trainings", "train") if train
                                 else ("", "Prediction", "/predictions", "predict"))
    enum = {f.name: f"{prefix}{f.name}" for f in fields}
    main = _route(verb.title(), f"{verb}_{route.strip('/')}_post", f"{noun}Request", f"{noun}Response")
    if not train:
        predictor = getattr(importlib.import_module(source.stem), name)  # imported by create_predictor already
        if any(is_streaming(predictor, method) for method in ("run", "predict")):
            main["post"]["x-cog-streaming"] = True
    input_schema = {"title": f"{prefix}Input", "type": "object",
                    "properties": {f.name: _input_property(f, enum[f.name]) for f in fields}}
    required = [f.name for f in fields if _required(f)]
    if required:
        input_schema["required"] = required
    string = {"type": "string"}
    refs = {"input": {"$ref": f"#/components/schemas/{prefix}Input"},
            "output": {"$ref": f"#/components/schemas/{prefix}Output"}}
    response_fields = {**refs, **{k: string for k in ("id", "version", "status", "error", "logs")},
                       **{k: {**string, "format": "date-time"} for k in ("created_at", "started_at", "completed_at")},
                       "metrics": {"type": "object"}}
    schemas = {
        f"{prefix}Input": input_schema,
        f"{prefix}Output": {**info.output.json_type(), "title": f"{prefix}Output"},
        f"{noun}Request": {"title": f"{noun}Request", "type": "object",
                           "properties": {"id": string, "input": refs["input"]}},
        f"{noun}Response": {"title": f"{noun}Response", "type": "object", "properties": response_fields},
        **{enum[f.name]: {"title": f.name, "description": "An enumeration.", "enum": f.choices,
                          **f.type.primitive.json_type()} for f in fields if f.choices is not None},
    }
    return {route: main}, schemas


def build_schema(predictor: str = "predict.py:Predictor", trainer: str | None = "train.py:train",
                 root: Path = ROOT) -> dict:
    """One OpenAPI document for the predictor and, when its file exists, the trainer (files relative to `root`),
    as `cog build` writes it: the server reads the same file in predict and in train mode."""
    paths, schemas = _interface(predictor, root, train=False)
    if trainer and (root / trainer.split(":")[0]).is_file():
        train_paths, train_schemas = _interface(trainer, root, train=True)
        paths, schemas = {**paths, **train_paths}, {**schemas, **train_schemas}
    string = {"type": "string"}
    schemas.update({
        "HTTPValidationError": {"title": "HTTPValidationError", "type": "object", "properties": {
            "detail": {"type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}}}},
        "ValidationError": {"title": "ValidationError", "type": "object", "required": ["loc", "msg", "type"],
                            "properties": {"loc": {"type": "array", "items": {"anyOf": [string, {"type": "integer"}]}},
                                           "msg": string, "type": string}},
    })
    return {"openapi": "3.0.2", "info": {"title": "Cog", "version": "0.1.0"}, "paths": paths,
            "components": {"schemas": schemas}}


_WRITING = threading.Lock()  # CPython 3.11's ast is not thread-safe ("AST constructor recursion depth mismatch")


def write_schema(predictor: str = "predict.py:Predictor", trainer: str | None = "train.py:train",
                 root: Path = ROOT) -> Path:
    """Write `root/.cog/openapi_schema.json`, where the Cog server started in `root` reads it (one thread at a
    time: servers started side by side in one process write it in turn)."""
    path = root / SCHEMA_PATH
    with _WRITING:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Atomically: a server starting in another process reads the file meanwhile.
        staging = path.with_name(f"{path.name}.{os.getpid()}")
        staging.write_text(json.dumps(build_schema(predictor, trainer, root), indent=2) + "\n")
        os.replace(staging, path)
    return path


if __name__ == "__main__":
    print(write_schema(*sys.argv[1:]))


def run_defaults(predictor_class) -> dict:
    """The default of every input of `predictor_class.run`, as Cog fills in what a request leaves out: for calling
    `run` directly (benchmarks), so that a new input never arrives as its `Input(...)` declaration."""
    parameters = inspect.signature(predictor_class.run).parameters
    return {name: getattr(p.default, "default", p.default) for name, p in parameters.items() if name != "self"}
