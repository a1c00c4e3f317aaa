"""TF Serving's JSON mapping of tensors for the REST API (request parsing, answer formatting).

Row format (``{"instances": [...]}``, answered with ``{"predictions": ...}``) and columnar
format (``{"inputs": ...}``, answered with ``{"outputs": ...}``). Strings are UTF-8 JSON
strings; binary values are ``{"b64": "..."}`` (inputs), and outputs whose name ends in
``_bytes`` or that are not valid UTF-8 are returned that way.
"""

from __future__ import annotations

import base64
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from serving.errors import invalid
from serving.loaded_version import SignatureInfo

MAX_JSON_DEPTH = 32  # nesting of a tensor value (rank) in a request body


def _flatten(value: Any, where: str, depth: int = 0) -> Tuple[Tuple[int, ...], List[Any]]:
    """Returns the shape of a rectangular nested JSON list and its leaves in order."""
    if depth > MAX_JSON_DEPTH:
        raise invalid(f"{where}: lists nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, list):
        if not value:
            return (0,), []
        shapes, leaves = [], []
        for item in value:
            shape, flat = _flatten(item, where, depth + 1)
            shapes.append(shape)
            leaves.extend(flat)
        if any(s != shapes[0] for s in shapes):
            raise invalid(f"{where}: ragged nested list (all rows must have the same shape)")
        return (len(value), *shapes[0]), leaves
    if isinstance(value, dict):
        if set(value) == {"b64"} and isinstance(value["b64"], str):
            try:
                return (), [base64.b64decode(value["b64"], validate=True)]
            except ValueError as e:
                raise invalid(f"{where}: invalid base64 value: {e}") from e
        raise invalid(f"{where}: unexpected JSON object (only {{'b64': ...}} is allowed)")
    if value is None:
        raise invalid(f"{where}: null is not a tensor value")
    return (), [value]


def json_to_ndarray(value: Any, spec: Any, where: str) -> np.ndarray:
    """Converts a JSON value to an array of the spec's dtype (TF Serving's JSON mapping).

    Raises:
        ServingError: INVALID_ARGUMENT for ragged lists or values of the wrong type.
    """
    shape, leaves = _flatten(value, where)
    dtype = spec.dtype
    if dtype.name == "string":
        out = np.empty(len(leaves), dtype=object)
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, str):
                try:
                    out[i] = leaf.encode("utf-8")
                except UnicodeEncodeError as e:  # lone surrogates such as "\ud800"
                    raise invalid(f"{where}: string is not valid Unicode ({e.reason})") from e
            elif isinstance(leaf, bytes):
                out[i] = leaf
            else:
                raise invalid(f"{where}: expects strings (dtype string), got {leaf!r}")
        return out.reshape(shape)
    if dtype.is_bool:
        ok = all(isinstance(v, bool) for v in leaves)
    elif dtype.is_integer:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in leaves)
    elif dtype.is_floating:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in leaves)
    else:
        raise invalid(f"{where}: dtype {dtype.name} is not supported over JSON")
    if not ok:
        bad = next(iter(v for v in leaves if not isinstance(v, (int, float))), leaves[0])
        raise invalid(f"{where}: expects dtype {dtype.name}, got a value like {bad!r}")
    try:
        return np.asarray(leaves, dtype=dtype.as_numpy_dtype).reshape(shape)
    except OverflowError as e:
        raise invalid(f"{where}: value out of range for {dtype.name}: {e}") from e


def _leaf_to_json(value: Any, binary: bool) -> Any:
    if isinstance(value, bytes):
        if not binary:
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                pass
        return {"b64": base64.b64encode(value).decode("ascii")}
    return value


def ndarray_to_json(name: str, array: np.ndarray) -> Any:
    """Converts an output array to JSON values (bytes as text, or b64 objects)."""
    if array.dtype.kind not in "OS":
        return array.tolist()
    binary = name.endswith("_bytes")

    def convert(v: Any) -> Any:
        return [convert(x) for x in v] if isinstance(v, list) else _leaf_to_json(v, binary)

    return convert(array.tolist())


def _single_input(sig: SignatureInfo, value: Any) -> bool:
    is_b64 = isinstance(value, dict) and set(value) == {"b64"}
    return len(sig.inputs) == 1 and (not isinstance(value, dict) or is_b64)


def parse_predict_body(body: Mapping[str, Any], sig: SignatureInfo) -> Tuple[Dict, bool]:
    """Returns (input arrays, row_format) for a predict request body."""
    has_rows, has_cols = "instances" in body, "inputs" in body
    if has_rows == has_cols:
        raise invalid("the request must have exactly one of 'instances' or 'inputs'")
    if has_cols:
        value = body["inputs"]
        if _single_input(sig, value):
            value = {next(iter(sig.inputs)): value}
        if not isinstance(value, dict):
            raise invalid(f"'inputs' must map input names {sorted(sig.inputs)} to values")
        return {k: _convert(sig, k, v, f"inputs[{k!r}]") for k, v in value.items()}, False
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise invalid("'instances' must be a non-empty list")
    if all(_single_input(sig, inst) for inst in instances):
        key = next(iter(sig.inputs))
        return {key: _convert(sig, key, instances, "instances")}, True
    if not all(isinstance(inst, dict) for inst in instances):
        raise invalid("every instance must be an object {input name: value} for this signature")
    names = set(instances[0])
    if any(set(inst) != names for inst in instances):
        raise invalid("every instance must have the same input names")
    return {
        k: _convert(sig, k, [inst[k] for inst in instances], f"instances[*][{k!r}]")
        for k in sorted(names)
    }, True


def _convert(sig: SignatureInfo, key: str, value: Any, where: str) -> np.ndarray:
    spec = sig.inputs.get(key)
    if spec is None:
        raise invalid(
            f"unknown input {key!r} for signature {sig.name!r} (expects {sorted(sig.inputs)})"
        )
    return json_to_ndarray(value, spec, where)


def format_predict(outputs: Mapping[str, np.ndarray], row_format: bool) -> Dict[str, Any]:
    """Formats outputs as ``{"predictions": ...}`` (row) or ``{"outputs": ...}``."""
    if not row_format:
        if len(outputs) == 1:
            ((name, value),) = outputs.items()
            return {"outputs": ndarray_to_json(name, value)}
        return {"outputs": {k: ndarray_to_json(k, v) for k, v in outputs.items()}}
    if len(outputs) == 1:
        ((name, value),) = outputs.items()
        if value.ndim == 0:
            raise invalid(f"output {name!r} is a scalar; use the columnar 'inputs' format")
        return {"predictions": ndarray_to_json(name, value)}
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in outputs.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise invalid(
            f"outputs have different batch sizes {sizes}; use the columnar 'inputs' format"
        )
    columns = {k: ndarray_to_json(k, v) for k, v in outputs.items()}
    rows = next(iter(sizes.values()))
    return {"predictions": [{k: columns[k][i] for k in columns} for i in range(rows)]}
