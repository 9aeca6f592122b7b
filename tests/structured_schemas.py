"""JSON schemas for the structured-output tests: nested objects, arrays, enums, ranges, optional fields, $ref.

Strings and arrays are bounded so that a small model's answers end well inside max_tokens.
"""

NAME = {"type": "string", "minLength": 1, "maxLength": 16}

SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"street": NAME, "city": NAME,
                                      "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
     "required": ["street", "city", "zip"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["score"]},
    {"type": "object", "properties": {"done": {"type": "boolean"}, "note": NAME}, "required": ["done"]},
    {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                          "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                         "required": ["x", "y"]}},
     "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
     "required": ["start", "end"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": NAME, "contact": {"type": "object", "properties": {"email": NAME}, "required": ["email"]}},
        "required": ["name", "contact"]}}, "required": ["user"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                                         "kind": {"enum": ["book", "pen"]}}, "required": ["id", "kind"]}}},
     "required": ["items"]},
    {"type": "object", "properties": {"version": {"const": "1.0"}, "title": NAME}, "required": ["version", "title"]},
    {"type": "object", "properties": {"count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 50}},
     "required": ["count"]},
    {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999},
                                                       NAME]}}, "required": ["id"]},
    {"type": "object", "properties": {"first": NAME, "middle": NAME, "last": NAME}, "required": ["first"]},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
     "required": ["date"]},
    {"type": "object", "properties": {"nickname": {"type": ["string", "null"], "maxLength": 12}},
     "required": ["nickname"]},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}}, "required": ["level"]},
    {"type": "object", "properties": {"grid": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
     "required": ["grid"]},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 10}},
     "required": ["word"]},
    {"type": "object", "properties": {"title": NAME, "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                                      "rating": {"type": "number", "minimum": 0, "maximum": 5},
                                      "seen": {"type": "boolean"}},
     "required": ["title", "year", "rating", "seen"]},
    {"$defs": {"name": NAME}, "type": "object",
     "properties": {"parent": {"$ref": "#/$defs/name"}, "child": {"$ref": "#/$defs/name"}},
     "required": ["parent", "child"]},
    {"type": "array", "minItems": 1, "maxItems": 3, "items": {"enum": ["north", "south", "east", "west"]}},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "code": {"type": "integer", "minimum": 100,
                                                                          "maximum": 599}},
     "required": ["ok", "code"], "additionalProperties": False},
]
