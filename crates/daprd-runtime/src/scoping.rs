//! Topic scoping (Dapr's `publishingScopes`, `subscriptionScopes`, `allowedTopics`,
//! `protectedTopics`), read from every pub/sub component's metadata.

use std::collections::{BTreeMap, BTreeSet};

use daprd_core::Metadata;

/// The scoping rules of one component.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopingRules {
    publishing: BTreeMap<String, BTreeSet<String>>,
    subscribing: BTreeMap<String, BTreeSet<String>>,
    allowed: BTreeSet<String>,
    protected: BTreeSet<String>,
}

/// `app1=t1,t2;app2=` → app → topics (spaces removed).
fn parse_scopes(value: &str) -> BTreeMap<String, BTreeSet<String>> {
    let clean: String = value.chars().filter(|c| !c.is_whitespace()).collect();
    let mut out = BTreeMap::new();
    for entry in clean.split(';').filter(|e| !e.is_empty()) {
        let (app, topics) = entry.split_once('=').unwrap_or((entry, ""));
        let set: &mut BTreeSet<String> = out.entry(app.to_string()).or_default();
        set.extend(
            topics
                .split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_string),
        );
    }
    out
}

fn parse_list(value: &str) -> BTreeSet<String> {
    let clean: String = value.chars().filter(|c| !c.is_whitespace()).collect();
    clean
        .split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

impl ScopingRules {
    /// Reads the rules from component metadata (keys case-insensitive).
    pub fn from_metadata(md: &Metadata) -> Self {
        Self {
            publishing: md
                .get("publishingScopes")
                .map(parse_scopes)
                .unwrap_or_default(),
            subscribing: md
                .get("subscriptionScopes")
                .map(parse_scopes)
                .unwrap_or_default(),
            allowed: md.get("allowedTopics").map(parse_list).unwrap_or_default(),
            protected: md
                .get("protectedTopics")
                .map(parse_list)
                .unwrap_or_default(),
        }
    }

    fn decide(
        &self,
        scopes: &BTreeMap<String, BTreeSet<String>>,
        app_id: &str,
        topic: &str,
    ) -> bool {
        if !self.allowed.is_empty() && !self.allowed.contains(topic) {
            return false;
        }
        let app_scope = scopes.get(app_id);
        if !self.protected.contains(topic) && app_scope.is_none() {
            return true;
        }
        app_scope.is_some_and(|topics| topics.contains(topic))
    }

    /// May `app_id` publish to `topic`?
    pub fn may_publish(&self, app_id: &str, topic: &str) -> bool {
        self.decide(&self.publishing, app_id, topic)
    }

    /// May `app_id` subscribe to `topic`?
    pub fn may_subscribe(&self, app_id: &str, topic: &str) -> bool {
        self.decide(&self.subscribing, app_id, topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(pairs: &[(&str, &str)]) -> ScopingRules {
        let md: Metadata = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ScopingRules::from_metadata(&md)
    }

    #[test]
    fn no_rules_allow_everything() {
        assert!(rules(&[]).may_publish("a", "t"));
        assert!(rules(&[]).may_subscribe("a", "t"));
    }

    #[test]
    fn publishing_scopes() {
        let r = rules(&[("publishingScopes", "app1=t1, t2;app2=;app3=t3")]);
        assert!(r.may_publish("app1", "t1"));
        assert!(r.may_publish("app1", "t2"));
        assert!(!r.may_publish("app1", "t3"));
        assert!(!r.may_publish("app2", "t1"), "app2= allows nothing");
        assert!(r.may_publish("unlisted", "anything"));
        assert!(
            r.may_subscribe("app2", "t1"),
            "publishing scopes do not restrict subscribing"
        );
    }

    #[test]
    fn allowed_topics_restrict_everyone() {
        let r = rules(&[("allowedTopics", "a,b"), ("publishingScopes", "app1=c")]);
        assert!(r.may_publish("x", "a"));
        assert!(!r.may_publish("x", "c"));
        assert!(
            !r.may_publish("app1", "c"),
            "allowedTopics wins over scopes"
        );
    }

    #[test]
    fn protected_topics_need_explicit_scope() {
        let r = rules(&[
            ("protectedTopics", "secret"),
            ("PUBLISHINGSCOPES", "app1=secret"),
        ]);
        assert!(r.may_publish("app1", "secret"));
        assert!(!r.may_publish("app2", "secret"));
        assert!(r.may_publish("app2", "open"));
    }

    #[test]
    fn subscription_scopes() {
        let r = rules(&[("subscriptionScopes", "app1=t1")]);
        assert!(r.may_subscribe("app1", "t1"));
        assert!(!r.may_subscribe("app1", "t2"));
        assert!(r.may_publish("app1", "t2"));
    }
}
