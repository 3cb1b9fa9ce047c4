//! Routing rules in CEL (Dapr's `routes.rules[].match`): compiled once per subscription,
//! evaluated with one variable, `event`, bound to the decoded CloudEvent.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value as Json;

/// Why a routing rule could not be compiled or evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The condition is not valid CEL.
    #[error("invalid CEL expression {expr:?}: {reason}")]
    Compile {
        /// The condition.
        expr: String,
        /// The parser's message.
        reason: String,
    },
    /// The condition gave something other than a boolean.
    #[error("routing rule {expr:?} returned {value}, not a boolean")]
    NotBoolean {
        /// The condition.
        expr: String,
        /// What it gave.
        value: String,
    },
    /// Evaluating the condition failed (a missing field, a type mismatch).
    #[error("evaluating routing rule {expr:?}: {reason}")]
    Eval {
        /// The condition.
        expr: String,
        /// The evaluator's message.
        reason: String,
    },
}

/// A routing rule: an optional CEL condition and the app path it sends to.
#[derive(Clone)]
pub struct Rule {
    /// The CEL text (empty = always matches).
    pub match_text: String,
    /// The app path (HTTP) or informational path (gRPC).
    pub path: String,
    program: Option<Arc<cel::Program>>,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule")
            .field("match", &self.match_text)
            .field("path", &self.path)
            .finish()
    }
}

impl PartialEq for Rule {
    fn eq(&self, other: &Self) -> bool {
        self.match_text == other.match_text && self.path == other.path
    }
}

impl Rule {
    /// Compiles `match_text` (empty = unconditional).
    ///
    /// # Errors
    /// [`RuleError::Compile`].
    pub fn new(match_text: &str, path: &str) -> Result<Self, RuleError> {
        let program = if match_text.trim().is_empty() {
            None
        } else {
            Some(Arc::new(cel::Program::compile(match_text).map_err(
                |e| RuleError::Compile {
                    expr: match_text.to_string(),
                    reason: e.to_string(),
                },
            )?))
        };
        Ok(Self {
            match_text: match_text.to_string(),
            path: path.to_string(),
            program,
        })
    }

    /// Whether the rule matches `event`.
    ///
    /// # Errors
    /// Evaluation errors, and results that are not booleans.
    pub fn matches(&self, event: &cel::Value) -> Result<bool, RuleError> {
        let Some(program) = &self.program else {
            return Ok(true);
        };
        let mut ctx = cel::Context::default();
        ctx.add_variable_from_value("event", event.clone());
        match program.execute(&ctx) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(RuleError::NotBoolean {
                expr: self.match_text.clone(),
                value: format!("{other:?}"),
            }),
            Err(e) => Err(RuleError::Eval {
                expr: self.match_text.clone(),
                reason: e.to_string(),
            }),
        }
    }
}

/// Converts JSON into a CEL value (integers that fit `int` stay integers).
pub fn json_to_cel(v: &Json) -> cel::Value {
    match v {
        Json::Null => cel::Value::Null,
        Json::Bool(b) => cel::Value::Bool(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                cel::Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                cel::Value::UInt(u)
            } else {
                cel::Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => cel::Value::String(Arc::new(s.clone())),
        Json::Array(a) => cel::Value::List(Arc::new(a.iter().map(json_to_cel).collect())),
        Json::Object(o) => {
            let map: HashMap<String, cel::Value> =
                o.iter().map(|(k, v)| (k.clone(), json_to_cel(v))).collect();
            cel::Value::from(map)
        }
    }
}

/// The first rule matching `event`, if any.
///
/// # Errors
/// An evaluation error of a rule tried before a match.
pub fn select<'r>(
    rules: &'r [Rule],
    event: &serde_json::Map<String, Json>,
) -> Result<Option<&'r Rule>, RuleError> {
    // Without CEL conditions the first rule wins: no conversion of the event at all.
    if rules.iter().all(|r| r.program.is_none()) {
        return Ok(rules.first());
    }
    let map: HashMap<String, cel::Value> = event
        .iter()
        .map(|(k, v)| (k.clone(), json_to_cel(v)))
        .collect();
    let value = cel::Value::from(map);
    for r in rules {
        if r.matches(&value)? {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(list: &[(&str, &str)]) -> Vec<Rule> {
        list.iter().map(|(m, p)| Rule::new(m, p).unwrap()).collect()
    }

    #[test]
    fn first_matching_rule_wins_and_default_catches_the_rest() {
        let r = rules(&[
            (
                r#"event.type == "widget" && event.data.price > 100"#,
                "/expensive",
            ),
            ("has(event.data.orderId)", "/orders"),
            ("", "/default"),
        ]);
        let ev = json!({"type": "widget", "data": {"price": 150}});
        assert_eq!(
            select(&r, ev.as_object().unwrap()).unwrap().unwrap().path,
            "/expensive"
        );
        let ev = json!({"type": "widget", "data": {"price": 50, "orderId": 1}});
        assert_eq!(
            select(&r, ev.as_object().unwrap()).unwrap().unwrap().path,
            "/orders"
        );
        let ev = json!({"type": "x", "data": {}});
        assert_eq!(
            select(&r, ev.as_object().unwrap()).unwrap().unwrap().path,
            "/default"
        );
    }

    #[test]
    fn no_match_and_errors() {
        let r = rules(&[(r#"event.type == "a""#, "/a")]);
        assert!(select(&r, json!({"type": "b"}).as_object().unwrap())
            .unwrap()
            .is_none());
        let r = rules(&[("other.x == 1", "/a")]);
        assert!(
            matches!(
                select(&r, json!({"type": "b"}).as_object().unwrap()),
                Err(RuleError::Eval { .. })
            ),
            "unknown variable fails at evaluation"
        );
        let r = rules(&[("event.type", "/a")]);
        assert!(
            matches!(
                select(&r, json!({"type": "b"}).as_object().unwrap()),
                Err(RuleError::NotBoolean { .. })
            ),
            "non-boolean result is an error"
        );
        assert!(
            matches!(
                Rule::new("event.type ==", "/a"),
                Err(RuleError::Compile { .. })
            ),
            "invalid CEL is rejected up front"
        );
    }

    #[test]
    fn floats_compare_with_ints() {
        let r = rules(&[("event.data.price > 100", "/x")]);
        let got = select(&r, json!({"data": {"price": 150.5}}).as_object().unwrap()).unwrap();
        assert_eq!(got.map(|r| r.path.as_str()), Some("/x"));
    }
}
