//! Removing JSON-Schema keywords that some served models reject from tool parameter schemas.
//!
//! A keyword is only a keyword in schema position: the walk follows the keywords whose values
//! are schemas (or maps and lists of schemas), so a property that happens to be called
//! `pattern` or `additionalProperties` inside `properties` is a name, and stays.

use serde_json::{Map, Value};

use super::report::{FilterAction, FilterReport};

/// Keywords removed wherever they appear in schema position.
///
/// `$defs`/`definitions` stay because `$ref` points into them; `$id` stays in a schema where some
/// `$ref` is not a plain `#/...` pointer, as that reference may resolve against it.
pub(crate) const REMOVED_KEYWORDS: [&str; 5] = [
    "$schema",
    "$id",
    "$comment",
    "additionalProperties",
    "unevaluatedProperties",
];

/// Deeper schemas are left as they are; parsed bodies cannot nest this deep anyway.
const MAX_DEPTH: usize = 256;

/// Strips one tool's parameter schema. Returns whether anything changed.
pub(crate) fn strip_schema(schema: &mut Value, report: &mut FilterReport) -> bool {
    let before = report.total();
    let keep_ids = has_non_pointer_ref(schema, 0);
    strip(schema, keep_ids, report, 0);
    report.total() != before
}

fn strip(schema: &mut Value, keep_ids: bool, report: &mut FilterReport, depth: usize) {
    let Value::Object(map) = schema else {
        // `true`/`false` schemas and anything malformed: nothing to strip.
        return;
    };
    if depth > MAX_DEPTH {
        return;
    }
    for keyword in REMOVED_KEYWORDS {
        if keyword == "$id" && keep_ids {
            continue;
        }
        if map.shift_remove(keyword).is_some() {
            report.bump(FilterAction::SchemaKeywordRemoved);
        }
    }
    prune_required(map, report);
    for (keyword, child) in map.iter_mut() {
        match keyword.as_str() {
            // Maps from a name to a schema: the names are data, the values schemas.
            "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas"
            | "dependencies" => {
                if let Value::Object(named) = child {
                    for sub in named.values_mut() {
                        strip(sub, keep_ids, report, depth + 1);
                    }
                }
            }
            // A schema or a list of schemas.
            "items" | "prefixItems" | "allOf" | "anyOf" | "oneOf" => match child {
                Value::Array(list) => {
                    for sub in list {
                        strip(sub, keep_ids, report, depth + 1);
                    }
                }
                sub => strip(sub, keep_ids, report, depth + 1),
            },
            "additionalItems" | "contains" | "not" | "if" | "then" | "else" | "propertyNames"
            | "unevaluatedItems" => strip(child, keep_ids, report, depth + 1),
            // `enum`, `const`, `default`, `examples` and the rest hold data, not schemas.
            _ => {}
        }
    }
}

/// Keeps `required` to names that `properties` declares, when the schema says which names
/// those are (no `patternProperties`). An emptied `required` is removed.
fn prune_required(map: &mut Map<String, Value>, report: &mut FilterReport) {
    if map.contains_key("patternProperties") {
        return;
    }
    let (Some(Value::Object(properties)), Some(Value::Array(required))) =
        (map.get("properties"), map.get("required"))
    else {
        return;
    };
    let declared = |entry: &Value| entry.as_str().is_some_and(|n| properties.contains_key(n));
    if required.iter().all(declared) {
        return;
    }
    let kept: Vec<Value> = required.iter().filter(|e| declared(e)).cloned().collect();
    report.add(
        FilterAction::SchemaRequiredPruned,
        (required.len() - kept.len()) as u64,
    );
    if kept.is_empty() {
        map.shift_remove("required");
    } else {
        map.insert("required".to_owned(), Value::Array(kept));
    }
}

/// Whether any `$ref` in the value is something other than a `#`/`#/...` JSON pointer.
fn has_non_pointer_ref(value: &Value, depth: usize) -> bool {
    if depth > MAX_DEPTH {
        return true;
    }
    match value {
        Value::Object(map) => map.iter().any(|(key, child)| {
            (key == "$ref"
                && child
                    .as_str()
                    .is_some_and(|r| r != "#" && !r.starts_with("#/")))
                || has_non_pointer_ref(child, depth + 1)
        }),
        Value::Array(list) => list
            .iter()
            .any(|child| has_non_pointer_ref(child, depth + 1)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    type Counts = Vec<(&'static str, u64)>;

    fn stripped(mut schema: Value) -> (Value, Vec<(&'static str, u64)>) {
        let mut report = FilterReport::default();
        let changed = strip_schema(&mut schema, &mut report);
        assert_eq!(changed, !report.is_empty());
        (schema, report.iter().collect())
    }

    #[test]
    fn removal_keeps_the_order_of_the_rest() {
        let (schema, _) = stripped(json!({"$schema": "s", "type": "object", "description": "d",
            "properties": {"b": {}, "a": {"$comment": "c", "type": "string", "title": "t"}},
            "required": ["b", "ghost"], "additionalProperties": false, "title": "last"}));
        assert_eq!(
            schema.to_string(),
            r#"{"type":"object","description":"d","properties":{"b":{},"a":{"type":"string","title":"t"}},"required":["b"],"title":"last"}"#
        );
    }

    #[test]
    fn schema_rules() {
        #[rustfmt::skip]
        let cases: [(Value, Value, Counts); 10] = [
            // Top-level annotations go.
            (json!({"$schema": "http://json-schema.org/draft-07/schema#", "$id": "urn:x", "$comment": "c",
                    "type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": false}),
             json!({"type": "object", "properties": {"a": {"type": "string"}}}),
             vec![("schema_keyword_removed", 4)]),
            // Properties named like keywords stay; their schemas are still stripped.
            (json!({"type": "object", "required": ["pattern", "additionalProperties", "minLength"],
                    "properties": {
                        "pattern": {"type": "string", "pattern": "^a"},
                        "additionalProperties": {"type": "object", "additionalProperties": {"type": "string"}},
                        "minLength": {"type": "integer", "minimum": 0},
                        "$schema": {"type": "string"}}}),
             json!({"type": "object", "required": ["pattern", "additionalProperties", "minLength"],
                    "properties": {
                        "pattern": {"type": "string", "pattern": "^a"},
                        "additionalProperties": {"type": "object"},
                        "minLength": {"type": "integer", "minimum": 0},
                        "$schema": {"type": "string"}}}),
             vec![("schema_keyword_removed", 1)]),
            // Nested positions: items, anyOf, $defs (kept, $ref needs it), not.
            (json!({"type": "array",
                    "items": {"type": "object", "additionalProperties": true},
                    "anyOf": [{"$comment": "x"}, true],
                    "not": {"unevaluatedProperties": false},
                    "$defs": {"node": {"type": "object", "additionalProperties": false}},
                    "prefixItems": [{"$ref": "#/$defs/node", "$id": "n"}]}),
             json!({"type": "array", "items": {"type": "object"}, "anyOf": [{}, true], "not": {},
                    "$defs": {"node": {"type": "object"}}, "prefixItems": [{"$ref": "#/$defs/node"}]}),
             vec![("schema_keyword_removed", 5)]),
            // Data keywords are not schemas: a default or enum value keeps its keys.
            (json!({"type": "object", "default": {"additionalProperties": 1, "$id": 2},
                    "enum": [{"$schema": 1}], "examples": [{"$comment": "e"}]}),
             json!({"type": "object", "default": {"additionalProperties": 1, "$id": 2},
                    "enum": [{"$schema": 1}], "examples": [{"$comment": "e"}]}),
             vec![]),
            // $id stays where a $ref may resolve against it.
            (json!({"$id": "https://x/s", "properties": {"a": {"$ref": "defs.json#/a"}}}),
             json!({"$id": "https://x/s", "properties": {"a": {"$ref": "defs.json#/a"}}}),
             vec![]),
            // required follows properties.
            (json!({"type": "object", "properties": {"a": {}}, "required": ["a", "gone", 3]}),
             json!({"type": "object", "properties": {"a": {}}, "required": ["a"]}),
             vec![("schema_required_pruned", 2)]),
            (json!({"type": "object", "properties": {}, "required": ["gone"]}),
             json!({"type": "object", "properties": {}}),
             vec![("schema_required_pruned", 1)]),
            // With patternProperties, required may name undeclared properties.
            (json!({"properties": {}, "patternProperties": {"^x": {}}, "required": ["xa"]}),
             json!({"properties": {}, "patternProperties": {"^x": {}}, "required": ["xa"]}),
             vec![]),
            // Not a schema object.
            (json!(true), json!(true), vec![]),
            (json!("string"), json!("string"), vec![]),
        ];
        for (input, want, want_report) in cases {
            let (got, report) = stripped(input.clone());
            assert_eq!(got, want, "{input}");
            assert_eq!(report, want_report, "{input}");
            let (again, report) = stripped(got);
            assert_eq!(again, want, "idempotent: {input}");
            assert!(report.is_empty(), "idempotent: {input}");
        }
    }
}
