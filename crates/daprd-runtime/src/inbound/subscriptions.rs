//! The subscription model and its three sources (as Dapr has them): declarative
//! `Subscription` resources (v1alpha1 and v2alpha1), programmatic subscriptions discovered
//! from the app (HTTP `GET /dapr/subscribe` JSON or gRPC `ListTopicSubscriptions`), and
//! streaming subscriptions; plus Dapr's precedence rules.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value as Json;
use serde_norway::Value as Yaml;

use crate::config::resources::{OtherManifest, ResourceError};
use crate::inbound::routing::Rule;

/// Where a subscription came from (metadata `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionKind {
    /// A `Subscription` resource.
    Declarative,
    /// Discovered from the app.
    Programmatic,
    /// A `SubscribeTopicEventsAlpha1` stream.
    Streaming,
}

/// Bulk subscribe settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkSubscribe {
    /// Bulk delivery on.
    pub enabled: bool,
    /// Flush after this many messages (default 100).
    pub max_messages: usize,
    /// Flush after this long (default 1000 ms).
    pub max_await_ms: u64,
}

impl Default for BulkSubscribe {
    fn default() -> Self {
        Self {
            enabled: false,
            max_messages: 100,
            max_await_ms: 1000,
        }
    }
}

/// One subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionSpec {
    /// Resource name (declarative only).
    pub name: String,
    /// Component name.
    pub pubsub: String,
    /// Topic.
    pub topic: String,
    /// Routing rules; the default route is the last, unconditional one.
    pub rules: Vec<Rule>,
    /// Subscription metadata (passed to the component too).
    pub metadata: BTreeMap<String, String>,
    /// Dead-letter topic (empty = none).
    pub dead_letter_topic: String,
    /// Bulk subscribe.
    pub bulk: BulkSubscribe,
    /// Source.
    pub kind: SubscriptionKind,
    /// App ids this applies to (declarative; empty = all).
    pub scopes: Vec<String>,
}

fn get_ci<'a>(obj: &'a serde_json::Map<String, Json>, key: &str) -> Option<&'a Json> {
    obj.get(key).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn json_str(obj: &serde_json::Map<String, Json>, key: &str) -> Result<String, String> {
    match get_ci(obj, key) {
        None | Some(Json::Null) => Ok(String::new()),
        Some(Json::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("field {key}: expected a string, got {other}")),
    }
}

fn json_str_map(
    obj: &serde_json::Map<String, Json>,
    key: &str,
) -> Result<BTreeMap<String, String>, String> {
    match get_ci(obj, key) {
        None | Some(Json::Null) => Ok(BTreeMap::new()),
        Some(Json::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Json::String(s) => Ok((k.clone(), s.clone())),
                Json::Null => Ok((k.clone(), String::new())),
                other => Err(format!("field {key}.{k}: expected a string, got {other}")),
            })
            .collect(),
        Some(other) => Err(format!("field {key}: expected an object, got {other}")),
    }
}

/// Builds the rule list: `rules` in order, then `default` (or v1 `route`) as catch-all.
pub fn build_rules(
    rules: &[(String, String)],
    default: &str,
    route: &str,
) -> Result<Vec<Rule>, String> {
    let mut out = Vec::with_capacity(rules.len() + 1);
    for (m, p) in rules {
        out.push(Rule::new(m, p).map_err(|e| e.to_string())?);
    }
    let fallback = if default.is_empty() { route } else { default };
    if !fallback.is_empty() {
        out.push(Rule::new("", fallback).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

fn parse_bulk_json(obj: &serde_json::Map<String, Json>) -> Result<BulkSubscribe, String> {
    let mut b = BulkSubscribe::default();
    if let Some(Json::Object(bo)) = get_ci(obj, "bulkSubscribe") {
        b.enabled = matches!(get_ci(bo, "enabled"), Some(Json::Bool(true)));
        if let Some(n) = get_ci(bo, "maxMessagesCount")
            .and_then(Json::as_i64)
            .filter(|n| *n > 0)
        {
            b.max_messages = usize::try_from(n).map_err(|e| e.to_string())?;
        }
        if let Some(n) = get_ci(bo, "maxAwaitDurationMs")
            .and_then(Json::as_i64)
            .filter(|n| *n > 0)
        {
            b.max_await_ms = n.unsigned_abs();
        }
    }
    Ok(b)
}

/// Parses the app's `GET /dapr/subscribe` answer (keys case-insensitive). Entries whose
/// rule list ends up empty are dropped, with a warning in the second element.
///
/// # Errors
/// Invalid JSON shape or CEL.
pub fn parse_programmatic_json(
    body: &[u8],
) -> Result<(Vec<SubscriptionSpec>, Vec<String>), String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((Vec::new(), Vec::new()));
    }
    let value: Json =
        serde_json::from_slice(body).map_err(|e| format!("invalid subscriptions json: {e}"))?;
    let Json::Array(items) = value else {
        return Err("invalid subscriptions json: expected an array".into());
    };
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for item in items {
        let Json::Object(obj) = item else {
            return Err("invalid subscriptions json: expected an array of objects".into());
        };
        let pubsub = json_str(&obj, "pubsubname")?;
        let topic = json_str(&obj, "topic")?;
        let route = json_str(&obj, "route")?;
        let (rules, default) = match get_ci(&obj, "routes") {
            Some(Json::Object(r)) => {
                let default = json_str(r, "default")?;
                let mut rules = Vec::new();
                if let Some(Json::Array(list)) = get_ci(r, "rules") {
                    for rule in list {
                        if let Json::Object(ro) = rule {
                            rules.push((json_str(ro, "match")?, json_str(ro, "path")?));
                        }
                    }
                }
                (rules, default)
            }
            _ => (Vec::new(), String::new()),
        };
        let rules = build_rules(&rules, &default, &route)?;
        if rules.is_empty() {
            warnings.push(format!(
                "subscription to topic {topic:?} on pubsub {pubsub:?} has no route and is ignored"
            ));
            continue;
        }
        out.push(SubscriptionSpec {
            name: String::new(),
            pubsub,
            topic,
            rules,
            metadata: json_str_map(&obj, "metadata")?,
            dead_letter_topic: json_str(&obj, "deadLetterTopic")?,
            bulk: parse_bulk_json(&obj)?,
            kind: SubscriptionKind::Programmatic,
            scopes: Vec::new(),
        });
    }
    Ok((out, warnings))
}

/// Parses declarative `Subscription` documents (v1alpha1 and v2alpha1).
pub fn parse_declarative(others: &[OtherManifest]) -> (Vec<SubscriptionSpec>, Vec<ResourceError>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for m in others.iter().filter(|m| m.kind == "Subscription") {
        // YAML → JSON, then the same case-insensitive reading Go's decoder does.
        let json = match serde_json::to_value(&m.doc) {
            Ok(j) => j,
            Err(e) => {
                errors.push(rerr(
                    &m.file,
                    "",
                    None,
                    format!("cannot read document: {e}"),
                ));
                continue;
            }
        };
        match parse_declarative_doc(&json, &m.doc) {
            Ok(s) => out.push(s),
            Err((name, field, msg)) => errors.push(rerr(&m.file, &name, field, msg)),
        }
    }
    (out, errors)
}

fn rerr(file: &Path, name: &str, field: Option<String>, message: String) -> ResourceError {
    ResourceError {
        file: file.to_path_buf(),
        component: (!name.is_empty()).then(|| format!("subscription {name}")),
        field,
        message,
    }
}

type DeclError = (String, Option<String>, String);

fn parse_declarative_doc(json: &Json, yaml: &Yaml) -> Result<SubscriptionSpec, DeclError> {
    let api = yaml.get("apiVersion").and_then(Yaml::as_str).unwrap_or("");
    let Json::Object(root) = json else {
        return Err((String::new(), None, "expected a mapping".into()));
    };
    let name = match get_ci(root, "metadata") {
        Some(Json::Object(md)) => json_str(md, "name").unwrap_or_default(),
        _ => String::new(),
    };
    let fail = |field: &str, msg: String| (name.clone(), Some(field.to_string()), msg);
    if name.is_empty() {
        return Err(fail("metadata.name", "is required".into()));
    }
    let Some(Json::Object(spec)) = get_ci(root, "spec") else {
        return Err(fail("spec", "is required".into()));
    };
    let pubsub = json_str(spec, "pubsubname").map_err(|e| fail("spec.pubsubname", e))?;
    if pubsub.is_empty() {
        return Err(fail("spec.pubsubname", "is required".into()));
    }
    let topic = json_str(spec, "topic").map_err(|e| fail("spec.topic", e))?;
    if topic.is_empty() {
        return Err(fail("spec.topic", "is required".into()));
    }
    let rules = if api == "dapr.io/v1alpha1" {
        let route = json_str(spec, "route").map_err(|e| fail("spec.route", e))?;
        build_rules(&[], "", &route).map_err(|e| fail("spec.route", e))?
    } else if api == "dapr.io/v2alpha1" {
        let (list, default) = match get_ci(spec, "routes") {
            Some(Json::Object(r)) => {
                let default = json_str(r, "default").map_err(|e| fail("spec.routes.default", e))?;
                let mut list = Vec::new();
                if let Some(Json::Array(items)) = get_ci(r, "rules") {
                    for (i, item) in items.iter().enumerate() {
                        let Json::Object(ro) = item else {
                            return Err(fail(
                                &format!("spec.routes.rules[{i}]"),
                                "must be a mapping with match and path".into(),
                            ));
                        };
                        list.push((
                            json_str(ro, "match")
                                .map_err(|e| fail(&format!("spec.routes.rules[{i}].match"), e))?,
                            json_str(ro, "path")
                                .map_err(|e| fail(&format!("spec.routes.rules[{i}].path"), e))?,
                        ));
                    }
                }
                (list, default)
            }
            _ => (Vec::new(), String::new()),
        };
        build_rules(&list, &default, "").map_err(|e| fail("spec.routes", e))?
    } else {
        return Err(fail(
            "apiVersion",
            format!(
                "{api:?} is not a Subscription version (use dapr.io/v2alpha1 or dapr.io/v1alpha1)"
            ),
        ));
    };
    if rules.is_empty() {
        return Err(fail(
            if api == "dapr.io/v1alpha1" {
                "spec.route"
            } else {
                "spec.routes"
            },
            "no route given".into(),
        ));
    }
    let scopes = match get_ci(root, "scopes") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(Json::as_str)
            .map(str::to_string)
            .collect(),
        Some(_) => return Err(fail("scopes", "must be a list of app ids".into())),
    };
    let metadata = match get_ci(spec, "metadata") {
        Some(Json::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    match v {
                        Json::String(s) => s.clone(),
                        Json::Null => String::new(),
                        o => o.to_string(),
                    },
                )
            })
            .collect(),
        None | Some(Json::Null) => BTreeMap::new(),
        Some(_) => return Err(fail("spec.metadata", "must be a mapping of strings".into())),
    };
    Ok(SubscriptionSpec {
        name: name.clone(),
        pubsub,
        topic,
        rules,
        metadata,
        dead_letter_topic: json_str(spec, "deadLetterTopic")
            .map_err(|e| fail("spec.deadLetterTopic", e))?,
        bulk: parse_bulk_json(spec).map_err(|e| fail("spec.bulkSubscribe", e))?,
        kind: SubscriptionKind::Declarative,
        scopes,
    })
}

/// Applies Dapr's precedence: per (pubsub, topic) the first declarative entry wins, a
/// programmatic entry replaces it, and among programmatic duplicates the last wins.
/// Declarative entries scoped to other apps are dropped first.
pub fn merge(
    declarative: Vec<SubscriptionSpec>,
    programmatic: Vec<SubscriptionSpec>,
    app_id: &str,
) -> Vec<SubscriptionSpec> {
    let mut order: Vec<(String, String)> = Vec::new();
    let mut by_key: BTreeMap<(String, String), SubscriptionSpec> = BTreeMap::new();
    for s in declarative {
        if !s.scopes.is_empty() && !s.scopes.iter().any(|a| a == app_id) {
            continue;
        }
        let key = (s.pubsub.clone(), s.topic.clone());
        if let std::collections::btree_map::Entry::Vacant(slot) = by_key.entry(key.clone()) {
            order.push(key);
            slot.insert(s);
        }
    }
    for s in programmatic {
        let key = (s.pubsub.clone(), s.topic.clone());
        if by_key.insert(key.clone(), s).is_none() {
            order.push(key);
        }
    }
    order
        .into_iter()
        .filter_map(|k| by_key.remove(&k))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::resources::{parse_file, LoadContext, Resources};

    fn decl(text: &str) -> (Vec<SubscriptionSpec>, Vec<ResourceError>) {
        let mut r = Resources::default();
        parse_file(
            Path::new("subs.yaml"),
            text.as_bytes(),
            &LoadContext {
                app_id: "a",
                namespace: None,
            },
            &mut r,
        );
        parse_declarative(&r.others)
    }

    #[test]
    fn programmatic_v1_and_v2_with_case_insensitive_keys() {
        let body = br#"[
          {"PubsubName":"ps","Topic":"a","Route":"/a","metadata":{"rawPayload":"true"},"deadLetterTopic":"dlq"},
          {"pubsubname":"ps","topic":"b","routes":{"rules":[{"match":"event.type == \"x\"","path":"/x"}],"default":"/b"},
           "bulkSubscribe":{"enabled":true,"maxMessagesCount":5}},
          {"pubsubname":"ps","topic":"c"}
        ]"#;
        let (subs, warnings) = parse_programmatic_json(body).unwrap();
        assert_eq!(subs.len(), 2);
        assert_eq!(
            warnings.len(),
            1,
            "entry without routes is dropped with a warning"
        );
        assert_eq!(subs[0].rules[0].path, "/a");
        assert_eq!(subs[0].metadata["rawPayload"], "true");
        assert_eq!(subs[0].dead_letter_topic, "dlq");
        assert_eq!(subs[1].rules.len(), 2);
        assert_eq!(subs[1].rules[1].path, "/b");
        assert!(subs[1].bulk.enabled);
        assert_eq!(subs[1].bulk.max_messages, 5);
        assert_eq!(subs[1].bulk.max_await_ms, 1000);
        assert!(parse_programmatic_json(b"").unwrap().0.is_empty());
        assert!(parse_programmatic_json(b"{").is_err());
        assert!(parse_programmatic_json(br#"[{"pubsubname":"p","topic":"t","routes":{"rules":[{"match":"event.type ==","path":"/x"}]}}]"#).is_err());
    }

    #[test]
    fn declarative_both_versions_and_errors() {
        let (subs, errs) = decl(
            "apiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata: {name: s2}\nspec:\n  pubsubname: ps\n  topic: orders\n  routes:\n    rules:\n    - match: event.type == \"a\"\n      path: /a\n    default: /orders\n  deadLetterTopic: dlq\n  metadata: {rawPayload: \"false\"}\nscopes: [a]\n---\napiVersion: dapr.io/v1alpha1\nkind: Subscription\nmetadata: {name: s1}\nspec: {topic: t1, pubsubname: ps, route: /t1}\n---\napiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata: {name: bad}\nspec: {topic: t}\n",
        );
        assert_eq!(subs.len(), 2, "{errs:?}");
        assert_eq!(subs[0].rules.len(), 2);
        assert_eq!(subs[0].dead_letter_topic, "dlq");
        assert_eq!(subs[0].scopes, vec!["a"]);
        assert_eq!(subs[1].rules[0].path, "/t1");
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].to_string().contains("subscription bad")
                && errs[0].to_string().contains("spec.pubsubname"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn precedence_rules() {
        let mk = |topic: &str, path: &str, kind, scopes: &[&str]| SubscriptionSpec {
            name: String::new(),
            pubsub: "ps".into(),
            topic: topic.into(),
            rules: vec![Rule::new("", path).unwrap()],
            metadata: BTreeMap::new(),
            dead_letter_topic: String::new(),
            bulk: BulkSubscribe::default(),
            kind,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        };
        use SubscriptionKind::*;
        let merged = merge(
            vec![
                mk("a", "/d1", Declarative, &[]),
                mk("a", "/d2", Declarative, &[]),
                mk("b", "/db", Declarative, &[]),
                mk("c", "/other-app", Declarative, &["other"]),
            ],
            vec![
                mk("b", "/p1", Programmatic, &[]),
                mk("b", "/p2", Programmatic, &[]),
                mk("d", "/pd", Programmatic, &[]),
            ],
            "me",
        );
        let got: Vec<(&str, &str)> = merged
            .iter()
            .map(|s| (s.topic.as_str(), s.rules[0].path.as_str()))
            .collect();
        assert_eq!(got, [("a", "/d1"), ("b", "/p2"), ("d", "/pd")]);
    }
}
