//! Topic patterns and event filters: which events a subscription receives.
//!
//! * A **topic pattern** is a `:`-separated glob. `*` inside a segment matches any characters
//!   of that segment (`job:*`, `job:parts-*`); a segment that is exactly `**` matches any number
//!   of segments, including none (`**`, `job:**`).
//! * A **filter** is a JSON object of key → value(s). The event's `context` and `payload` are
//!   flattened to dotted keys (`context.jobId`, `payload.partData.part`). A filter key matches
//!   every flattened key equal to it or ending with `.` + it, so `job` matches `payload.job`
//!   but not `context.jobId`. All filter keys must match (AND); a list of values means any one
//!   of them (OR); a string value is a glob (`*`, `?`) over string values; any other value
//!   compares exactly (numbers by value, so `1` equals `1.0`; two integers exactly, however
//!   large, so `9007199254740993` is not `9007199254740992`). A key that matches nothing in
//!   the event fails the filter.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::Event;

/// A compiled topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    source: String,
    segments: Vec<String>,
}

impl TopicPattern {
    /// Parses a pattern; refuses empty patterns and empty segments.
    pub fn parse(pattern: &str) -> Result<Self> {
        if pattern.is_empty() || pattern.split(':').any(str::is_empty) {
            return Err(Error::invalid(format!("topic pattern `{pattern}` has an empty segment")));
        }
        Ok(Self { source: pattern.to_owned(), segments: pattern.split(':').map(str::to_owned).collect() })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        // Runs for every subscription on every event the writer stores: no allocation.
        match_segments(&self.segments, topic.split(':'))
    }
}

fn match_segments(pattern: &[String], mut topic: std::str::Split<'_, char>) -> bool {
    match pattern.split_first() {
        None => topic.next().is_none(),
        // `**` swallows none, one, … or all of the remaining segments.
        Some((first, rest)) if first == "**" => loop {
            if match_segments(rest, topic.clone()) {
                return true;
            }
            if topic.next().is_none() {
                return false;
            }
        },
        Some((first, rest)) => match topic.next() {
            Some(t) => glob(first, t) && match_segments(rest, topic),
            None => false,
        },
    }
}

/// Matches `text` against a glob where `*` is any run of characters and `?` one character.
pub fn glob(pattern: &str, text: &str) -> bool {
    // Iterative matcher with one backtrack point (the last `*`): linear in practice, no
    // recursion. Positions are byte offsets on char boundaries, so nothing is collected.
    let next = |s: &str, at: usize| s[at..].chars().next();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while let Some(tc) = next(text, ti) {
        match next(pattern, pi) {
            // `*` first: a `*` in the pattern is a wildcard even where the text has a `*`.
            Some('*') => {
                star = Some(pi);
                mark = ti;
                pi += 1;
            }
            Some(pc) if pc == '?' || pc == tc => {
                pi += pc.len_utf8();
                ti += tc.len_utf8();
            }
            _ => {
                let Some(s) = star else { return false };
                pi = s + 1;
                mark += next(text, mark).map_or(1, char::len_utf8);
                ti = mark;
            }
        }
    }
    pattern[pi..].chars().all(|c| c == '*')
}

/// A compiled filter.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    clauses: Vec<(String, Vec<Value>)>,
}

impl Filter {
    /// A filter that lets every event through.
    pub fn any() -> Self {
        Self { clauses: Vec::new() }
    }

    /// Compiles a filter from a JSON object (`null` means no filter).
    pub fn parse(filter: &Value) -> Result<Self> {
        let object = match filter {
            Value::Null => return Ok(Self::any()),
            Value::Object(o) => o,
            other => return Err(Error::invalid(format!("a filter must be an object, not {other}"))),
        };
        let mut clauses = Vec::with_capacity(object.len());
        for (key, value) in object {
            if key.is_empty() || key.split('.').any(str::is_empty) {
                return Err(Error::invalid(format!("filter key `{key}` has an empty segment")));
            }
            let values = match value {
                Value::Array(list) if list.is_empty() => {
                    return Err(Error::invalid(format!("filter key `{key}` has an empty list of values")));
                }
                Value::Array(list) => list.clone(),
                Value::Object(_) => {
                    return Err(Error::invalid(format!(
                        "filter key `{key}`: objects cannot be matched; name a nested key instead"
                    )));
                }
                single => vec![single.clone()],
            };
            clauses.push((key.clone(), values));
        }
        Ok(Self { clauses })
    }

    /// True when the filter has no clause.
    pub fn is_any(&self) -> bool {
        self.clauses.is_empty()
    }

    /// Whether the event passes.
    pub fn matches(&self, event: &Event) -> bool {
        if self.clauses.is_empty() {
            return true;
        }
        let flat = flatten_event(event);
        self.matches_flat(&flat)
    }

    /// Whether already-flattened event keys pass (lets a caller flatten once for many filters).
    pub fn matches_flat(&self, flat: &Flat<'_>) -> bool {
        self.clauses.iter().all(|(key, wanted)| {
            flat.leaves()
                .filter(|(k, _)| {
                    *k == key || (k.ends_with(key.as_str()) && k.as_bytes()[k.len() - key.len() - 1] == b'.')
                })
                .any(|(_, actual)| wanted.iter().any(|w| value_matches(w, actual)))
        })
    }
}

fn value_matches(wanted: &Value, actual: &Value) -> bool {
    match (wanted, actual) {
        (Value::String(p), Value::String(a)) => glob(p, a),
        // Integers as integers: as f64, two integers past 2^53 apart by less than their
        // precision would compare equal.
        (Value::Number(w), Value::Number(a)) => match (integer(w), integer(a)) {
            (Some(w), Some(a)) => w == a,
            _ => w.as_f64() == a.as_f64(),
        },
        (w, a) => w == a,
    }
}

fn integer(n: &serde_json::Number) -> Option<i128> {
    n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from))
}

/// Flattens an event's context and payload into dotted keys with leaf values.
pub fn flatten_event(event: &Event) -> Flat<'_> {
    let mut flat = Flat { keys: String::with_capacity(512), leaves: Vec::with_capacity(16) };
    let mut path = String::with_capacity(64);
    for (name, value) in [("context", &event.context), ("payload", &event.payload)] {
        path.clear();
        path.push_str(name);
        flat.add(&mut path, value);
    }
    flat
}

/// An event's leaves by full dotted key (`payload.job`), in one buffer: flattening runs for
/// every event routed to a filtered subscription, on the store's writer thread, so it makes
/// two allocations per event rather than one per leaf.
#[derive(Debug)]
pub struct Flat<'a> {
    /// Every key, one after another.
    keys: String,
    /// Each leaf's key as a range of `keys`, and its value.
    leaves: Vec<(std::ops::Range<usize>, &'a Value)>,
}

impl<'a> Flat<'a> {
    /// Adds `value` under `path`, which it leaves as it found it.
    fn add(&mut self, path: &mut String, value: &'a Value) {
        match value {
            Value::Object(map) => {
                let at = path.len();
                for (k, v) in map {
                    path.push('.');
                    path.push_str(k);
                    self.add(path, v);
                    path.truncate(at);
                }
            }
            leaf => {
                let start = self.keys.len();
                self.keys.push_str(path);
                self.leaves.push((start..self.keys.len(), leaf));
            }
        }
    }

    /// The leaves, each with its full key.
    pub fn leaves(&self) -> impl Iterator<Item = (&str, &'a Value)> + '_ {
        self.leaves.iter().map(|(range, value)| (&self.keys[range.clone()], *value))
    }

    /// How many leaves.
    pub fn len(&self) -> usize {
        self.leaves.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }
}

/// A topic pattern and a filter together: one subscription's selector.
#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    /// Which topics.
    pub topic: TopicPattern,
    /// Which events of those topics.
    pub filter: Filter,
}

impl Selector {
    /// Compiles both parts.
    pub fn parse(topic: &str, filter: &Value) -> Result<Self> {
        Ok(Self { topic: TopicPattern::parse(topic)?, filter: Filter::parse(filter)? })
    }

    /// Whether the event is selected.
    pub fn matches(&self, event: &Event) -> bool {
        self.topic.matches(&event.topic) && self.filter.matches(event)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(topic: &str, context: Value, payload: Value) -> Event {
        Event { id: "evt_1".into(), seq: 1, topic: topic.into(), context, payload, created_at: 0 }
    }

    #[test]
    fn topic_patterns() {
        let table = [
            ("job:ready", "job:ready", true),
            ("job:ready", "job:failed", false),
            ("job:*", "job:ready", true),
            ("job:*", "job:parts-completed", true),
            ("job:*", "records:created", false),
            ("job:*", "job", false),
            ("job:*", "job:ready:extra", false),
            ("**", "job:ready", true),
            ("**", "anything", true),
            ("job:**", "job", true),
            ("job:**", "job:a:b", true),
            ("**:ready", "job:ready", true),
            ("**:ready", "ready", true),
            ("**:ready", "job:updated", false),
            ("job:parts-*", "job:parts-completed", true),
            ("job:parts-*", "job:ready", false),
            ("*:created", "records:created", true),
            ("*:created", "job:created", true),
            ("*", "job:created", false),
        ];
        for (pattern, topic, want) in table {
            assert_eq!(TopicPattern::parse(pattern).unwrap().matches(topic), want, "{pattern} vs {topic}");
        }
        for bad in ["", "job:", ":ready", "job::ready"] {
            assert!(TopicPattern::parse(bad).is_err(), "`{bad}` must be refused");
        }
    }

    #[test]
    fn globs() {
        let table = [
            ("sheet:submit*", "sheet:submitLargeSheet", true),
            ("sheet:submit*", "sheet:validate", false),
            ("*Large*", "sheet:submitLargeSheet", true),
            ("s?eet:*", "sheet:x", true),
            ("a*b*c", "abxbc", true),
            ("a*b*c", "abxbd", false),
            ("", "", true),
            ("*", "", true),
            ("?", "", false),
            // A `*` in the text is still only text: the pattern's `*` stays a wildcard.
            ("a*", "a*b", true),
            ("*b", "**b", true),
            ("a?c", "a*c", true),
            ("é?", "éé", true),
            ("?", "é", true),
            ("*é", "aéé", true),
            ("a*é", "aé!", false),
        ];
        for (p, t, want) in table {
            assert_eq!(glob(p, t), want, "{p} vs {t}");
        }
    }

    #[test]
    fn filters() {
        let parent = event(
            "job:ready",
            json!({"environmentId": "env_1", "jobId": "job_1", "sheetId": "sh_1", "actorId": "system"}),
            json!({"job": "sheet:submitLargeSheet", "isPart": false, "status": "ready", "operation": "submitLargeSheet"}),
        );
        let part = event(
            "job:ready",
            json!({"environmentId": "env_1", "jobId": "job_2"}),
            json!({"job": "sheet:submitLargeSheet", "isPart": true, "partData": {"part": 3, "total": 10}}),
        );
        let table = [
            (json!(null), true, true),
            (json!({}), true, true),
            (json!({"job": "sheet:submitLargeSheet", "isPart": false}), true, false),
            (json!({"job": "sheet:submitLargeSheet", "isPart": true}), false, true),
            (json!({"job": "sheet:submit*"}), true, true),
            (json!({"job": "file:*"}), false, false),
            (json!({"job": ["file:*", "sheet:*"]}), true, true),
            (json!({"isPart": [true, false]}), true, true),
            (json!({"part": 3}), false, true),
            (json!({"part": 3.0}), false, true),
            (json!({"partData.part": [1, 2, 3]}), false, true),
            (json!({"payload.partData.total": 10}), false, true),
            (json!({"sheetId": "sh_*"}), true, false),
            (json!({"environmentId": "env_1", "isPart": true}), false, true),
            (json!({"environmentId": "env_2"}), false, false),
            // `job` is a suffix of `payload.job` on a key boundary, never of `context.jobId`.
            (json!({"job": "job_1"}), false, false),
            (json!({"jobId": "job_1"}), true, false),
            (json!({"isPart": "false"}), false, false),
            (json!({"missing": "x"}), false, false),
        ];
        for (filter, want_parent, want_part) in table {
            let f = Filter::parse(&filter).unwrap();
            assert_eq!(f.matches(&parent), want_parent, "{filter} on the parent");
            assert_eq!(f.matches(&part), want_part, "{filter} on the part");
        }
        for bad in
            [json!([1]), json!("job"), json!({"": 1}), json!({"a..b": 1}), json!({"job": []}), json!({"x": {"y": 1}})]
        {
            assert!(Filter::parse(&bad).is_err(), "{bad} must be refused");
        }
    }

    /// Generated inputs against plain reference definitions.
    mod generated {
        use proptest::prelude::*;
        use serde_json::json;

        use super::super::*;
        use super::event;
        use crate::generate::json_leaf;

        /// The glob's definition, as dynamic programming over chars: `*` any run, `?` one char.
        fn glob_reference(p: &[char], t: &[char]) -> bool {
            let mut m = vec![vec![false; t.len() + 1]; p.len() + 1];
            m[0][0] = true;
            for i in 1..=p.len() {
                for j in 0..=t.len() {
                    m[i][j] = match p[i - 1] {
                        '*' => m[i - 1][j] || (j > 0 && m[i][j - 1]),
                        '?' => j > 0 && m[i - 1][j - 1],
                        c => j > 0 && t[j - 1] == c && m[i - 1][j - 1],
                    };
                }
            }
            m[p.len()][t.len()]
        }

        /// Topic patterns by definition: `**` any run of segments, else a glob per segment.
        fn topic_reference(p: &[&str], t: &[&str]) -> bool {
            match p.split_first() {
                None => t.is_empty(),
                Some((&"**", rest)) => (0..=t.len()).any(|k| topic_reference(rest, &t[k..])),
                Some((first, rest)) => t.split_first().is_some_and(|(s, more)| {
                    glob_reference(&first.chars().collect::<Vec<_>>(), &s.chars().collect::<Vec<_>>())
                        && topic_reference(rest, more)
                }),
            }
        }

        /// Few distinct characters (some of them multibyte) so that matches are common.
        fn text(wild: bool) -> impl Strategy<Value = String> {
            let chars: Vec<char> =
                if wild { vec!['a', 'b', 'é', '*', '?', '*'] } else { vec!['a', 'b', 'é', '*', '?'] };
            proptest::collection::vec(proptest::sample::select(chars), 0..10).prop_map(|v| v.into_iter().collect())
        }

        fn segments(wild: bool) -> impl Strategy<Value = Vec<String>> {
            let segment = if wild {
                prop_oneof![1 => Just("**".to_owned()), 4 => text(true).prop_filter("non-empty", |s| !s.is_empty())]
                    .boxed()
            } else {
                text(false).prop_filter("non-empty", |s| !s.is_empty()).boxed()
            };
            proptest::collection::vec(segment, 1..5)
        }

        fn payload() -> impl Strategy<Value = Value> {
            let key = "[a-zA-Z][a-zA-Z0-9_]{0,6}";
            let inner = proptest::collection::btree_map(key, json_leaf(), 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect()));
            proptest::collection::btree_map(key, prop_oneof![3 => json_leaf(), 1 => inner], 1..6)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
        }

        proptest! {
            #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn glob_matches_its_definition(p in text(true), t in text(false)) {
                let (pc, tc): (Vec<char>, Vec<char>) = (p.chars().collect(), t.chars().collect());
                prop_assert_eq!(glob(&p, &t), glob_reference(&pc, &tc), "{:?} vs {:?}", p, t);
            }

            #[test]
            fn every_text_matches_itself_as_a_glob(t in any::<String>()) {
                prop_assert!(glob(&t, &t));
            }

            #[test]
            fn topic_patterns_match_their_definition(p in segments(true), t in segments(false)) {
                let pattern = TopicPattern::parse(&p.join(":")).unwrap();
                let (ps, ts): (Vec<&str>, Vec<&str>) = (p.iter().map(String::as_str).collect(), t.iter().map(String::as_str).collect());
                prop_assert_eq!(pattern.matches(&t.join(":")), topic_reference(&ps, &ts), "{:?} vs {:?}", p, t);
            }

            /// Any leaf of an event, named by its full key or by its last segment, with its own
            /// value, is a filter the event passes.
            #[test]
            fn an_event_passes_a_filter_made_of_its_own_leaves(payload in payload(), pick in any::<proptest::sample::Index>(), short in any::<bool>()) {
                let e = event("job:ready", json!({"environmentId": "env_1"}), payload);
                let flat = flatten_event(&e);
                let (key, value) = flat.leaves().nth(pick.index(flat.len())).unwrap();
                let name = if short { key.rsplit('.').next().unwrap() } else { key };
                let filter = Filter::parse(&json!({ name: value })).unwrap();
                prop_assert!(filter.matches(&e), "{} = {} on {}", name, value, e.payload);
            }

            /// Two different integers never match, however large; equal numbers always do.
            #[test]
            fn integers_match_exactly(a in any::<u64>(), d in 1u64..4) {
                let e = event("job:ready", json!({}), json!({ "n": a }));
                let other = a.checked_add(d).unwrap_or(a - d);
                let same = Filter::parse(&json!({ "n": a })).unwrap();
                prop_assert!(same.matches(&e), "{} did not match itself", a);
                prop_assert!(!Filter::parse(&json!({ "n": other })).unwrap().matches(&e), "{} matched {}", other, a);
            }
        }
    }
}
