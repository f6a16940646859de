//! Generators for property tests (feature `generate`): the JSON values jobhost stores and
//! matches, with the edges that break encoders — any unicode, integers at the ends of `i64`
//! and `u64`, floats of every magnitude, nulls, nesting.

use proptest::prelude::*;
use serde_json::{Map, Value};

/// A JSON leaf: any string, an integer (the ends of `i64` and `u64` included), a finite
/// float, a boolean or null.
pub fn json_leaf() -> impl Strategy<Value = Value> + Clone {
    prop_oneof![
        any::<String>().prop_map(Value::from),
        prop_oneof![Just(i64::MIN), Just(i64::MAX), any::<i64>()].prop_map(Value::from),
        prop_oneof![Just(u64::MAX), any::<u64>()].prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(Value::Null),
    ]
}

/// A JSON value: a leaf, or lists and objects of them nested up to `depth` levels.
pub fn json_value(depth: u32) -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(depth, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A record's values: up to `max` fields with non-empty keys of any unicode.
pub fn record_values(max: usize) -> impl Strategy<Value = Map<String, Value>> {
    proptest::collection::btree_map(any::<String>().prop_filter("a key", |k| !k.is_empty()), json_value(2), 0..max)
        .prop_map(|m| m.into_iter().collect())
}
