//! The reconciler's pure half: the state applied and the state desired in, a plan of what to
//! add, change and remove out. Nothing here touches a component.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::config::resources::ComponentManifest;
use crate::inbound::subscriptions::SubscriptionSpec;

/// What to do with the components.
#[derive(Debug, Default, PartialEq)]
pub struct ComponentPlan {
    /// New names.
    pub added: Vec<ComponentManifest>,
    /// Names whose manifest changed.
    pub changed: Vec<ComponentManifest>,
    /// Names no longer desired.
    pub removed: Vec<String>,
}

impl ComponentPlan {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Whether two manifests ask for the same component (the file they are in does not count).
fn same(a: &ComponentManifest, b: &ComponentManifest) -> bool {
    a.name == b.name
        && a.namespace == b.namespace
        && a.ty == b.ty
        && a.version == b.version
        && a.ignore_errors == b.ignore_errors
        && a.init_timeout == b.init_timeout
        && a.metadata == b.metadata
        && a.secret_store == b.secret_store
        && a.scopes == b.scopes
}

/// Compares the `applied` components with the `desired` ones. A component applied from a
/// file in `broken` (one that could not be read or parsed this time) is kept as it is: a
/// typo never takes a working component down.
pub fn components(
    applied: &BTreeMap<String, ComponentManifest>,
    desired: &[ComponentManifest],
    broken: &BTreeSet<PathBuf>,
) -> ComponentPlan {
    let mut plan = ComponentPlan::default();
    let mut seen = BTreeSet::new();
    for d in desired {
        if !seen.insert(d.name.as_str()) {
            continue; // a duplicate name is an error of the loader; the first one counts
        }
        match applied.get(&d.name) {
            None => plan.added.push(d.clone()),
            Some(a) if !same(a, d) => plan.changed.push(d.clone()),
            Some(_) => {}
        }
    }
    for (name, a) in applied {
        if !seen.contains(name.as_str()) && !broken.contains(&a.file) {
            plan.removed.push(name.clone());
        }
    }
    plan
}

/// What to do with the app's subscriptions.
#[derive(Debug, Default, PartialEq)]
pub struct SubscriptionPlan {
    /// Running subscriptions no longer desired (by id).
    pub removed: Vec<u64>,
    /// Running subscriptions whose new spec asks the component for the same thing (topic,
    /// metadata, bulk): their pipeline is swapped in place.
    pub swapped: Vec<(u64, SubscriptionSpec)>,
    /// Running subscriptions that must subscribe again (new metadata or bulk settings).
    pub restarted: Vec<(u64, SubscriptionSpec)>,
    /// New subscriptions.
    pub added: Vec<SubscriptionSpec>,
}

/// Whether `a` and `b` subscribe the component to the same thing.
fn same_request(a: &SubscriptionSpec, b: &SubscriptionSpec) -> bool {
    a.pubsub == b.pubsub && a.topic == b.topic && a.metadata == b.metadata && a.bulk == b.bulk
}

/// Compares the `running` subscriptions with the `desired` ones, keyed by (pubsub, topic).
pub fn subscriptions(
    running: &[(u64, SubscriptionSpec)],
    desired: &[SubscriptionSpec],
) -> SubscriptionPlan {
    let mut plan = SubscriptionPlan::default();
    let key = |s: &SubscriptionSpec| (s.pubsub.clone(), s.topic.clone());
    let wanted: BTreeMap<_, _> = desired.iter().map(|s| (key(s), s)).collect();
    let mut have = BTreeSet::new();
    for (id, spec) in running {
        have.insert(key(spec));
        match wanted.get(&key(spec)) {
            None => plan.removed.push(*id),
            Some(d) if *d == spec => {}
            Some(d) if same_request(d, spec) => plan.swapped.push((*id, (*d).clone())),
            Some(d) => plan.restarted.push((*id, (*d).clone())),
        }
    }
    plan.added = desired
        .iter()
        .filter(|s| !have.contains(&key(s)))
        .cloned()
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::resources::{parse_file, LoadContext, Resources};
    use std::path::Path;

    fn parsed(file: &str, text: &str) -> Vec<ComponentManifest> {
        let mut r = Resources::default();
        parse_file(
            Path::new(file),
            text.as_bytes(),
            &LoadContext {
                app_id: "app",
                namespace: None,
            },
            &mut r,
        );
        r.components
    }

    fn component(name: &str, value: &str) -> String {
        format!("apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: {name}}}\nspec:\n  type: pubsub.in-memory\n  version: v1\n  metadata: [{{name: x, value: '{value}'}}]\n---\n")
    }

    fn applied(list: Vec<ComponentManifest>) -> BTreeMap<String, ComponentManifest> {
        list.into_iter().map(|c| (c.name.clone(), c)).collect()
    }

    #[test]
    fn added_changed_removed_and_untouched() {
        let before = applied(parsed(
            "a.yaml",
            &(component("a", "1") + &component("b", "1") + &component("c", "1")),
        ));
        let after = parsed(
            "a.yaml",
            &(component("a", "1") + &component("b", "2") + &component("d", "1")),
        );
        let plan = components(&before, &after, &BTreeSet::new());
        assert_eq!(
            plan.added
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["d"]
        );
        assert_eq!(
            plan.changed
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(plan.removed, ["c"]);
    }

    #[test]
    fn a_component_moved_to_another_file_is_unchanged() {
        let before = applied(parsed("a.yaml", &component("a", "1")));
        let after = parsed("b.yaml", &component("a", "1"));
        assert!(components(&before, &after, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn components_of_a_broken_file_are_kept() {
        let before = applied(parsed(
            "a.yaml",
            &(component("a", "1") + &component("b", "1")),
        ));
        let broken: BTreeSet<PathBuf> = [PathBuf::from("a.yaml")].into();
        // the file no longer parses: nothing of it is desired, nothing of it goes
        assert!(components(&before, &[], &broken).is_empty());
        // another file's component still goes
        let mut before = before;
        before.extend(applied(parsed("other.yaml", &component("o", "1"))));
        assert_eq!(components(&before, &[], &broken).removed, ["o"]);
    }

    fn spec(topic: &str, route: &str, dlq: &str, md: &[(&str, &str)]) -> SubscriptionSpec {
        use crate::inbound::subscriptions::{BulkSubscribe, SubscriptionKind};
        SubscriptionSpec {
            name: String::new(),
            pubsub: "ps".into(),
            topic: topic.into(),
            rules: vec![crate::inbound::routing::Rule::new("", route).unwrap()],
            metadata: md
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dead_letter_topic: dlq.into(),
            bulk: BulkSubscribe::default(),
            kind: SubscriptionKind::Declarative,
            scopes: Vec::new(),
        }
    }

    #[test]
    fn routes_swap_in_place_metadata_resubscribes() {
        let running = vec![
            (1, spec("same", "/a", "", &[])),
            (2, spec("route", "/a", "", &[])),
            (3, spec("dlq", "/a", "", &[])),
            (4, spec("meta", "/a", "", &[])),
            (5, spec("gone", "/a", "", &[])),
        ];
        let desired = vec![
            spec("same", "/a", "", &[]),
            spec("route", "/b", "", &[]),
            spec("dlq", "/a", "dead", &[]),
            spec("meta", "/a", "", &[("rawPayload", "true")]),
            spec("new", "/a", "", &[]),
        ];
        let plan = subscriptions(&running, &desired);
        assert_eq!(plan.removed, [5]);
        assert_eq!(
            plan.swapped.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(plan.swapped[0].1.rules, desired[1].rules);
        assert_eq!(
            plan.restarted.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [4]
        );
        assert_eq!(
            plan.added
                .iter()
                .map(|s| s.topic.as_str())
                .collect::<Vec<_>>(),
            ["new"]
        );
    }
}
