//! The metadata document (`GET /v1.0/metadata`, gRPC `GetMetadata`).

use daprd_proto::runtime::v1 as pb;
use serde_json::{json, Map, Value};

use crate::api::ApiState;
use crate::config::RUNTIME_VERSION;
use crate::inbound::subscriptions::SubscriptionKind;

/// The gRPC `GetMetadataResponse` for the current state.
pub fn get_metadata(state: &ApiState) -> pb::GetMetadataResponse {
    let store = state.publisher.store();
    let app = &state.config.app;
    pb::GetMetadataResponse {
        id: state.config.app_id.clone(),
        registered_components: store
            .registered()
            .iter()
            .map(|c| pb::RegisteredComponents {
                name: c.name.clone(),
                r#type: c.ty.clone(),
                version: c.version.clone(),
                capabilities: c.capabilities.clone(),
            })
            .collect(),
        extended_metadata: state
            .extended
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        subscriptions: state
            .subscriptions
            .list()
            .into_iter()
            .map(|s| pb::PubsubSubscription {
                pubsub_name: s.pubsub,
                topic: s.topic,
                metadata: s.metadata.into_iter().collect(),
                rules: Some(pb::PubsubSubscriptionRules {
                    rules: s
                        .rules
                        .iter()
                        .map(|r| pb::PubsubSubscriptionRule {
                            r#match: r.match_text.clone(),
                            path: r.path.clone(),
                        })
                        .collect(),
                }),
                dead_letter_topic: s.dead_letter_topic,
                r#type: match s.kind {
                    SubscriptionKind::Declarative => pb::PubsubSubscriptionType::Declarative,
                    SubscriptionKind::Programmatic => pb::PubsubSubscriptionType::Programmatic,
                    SubscriptionKind::Streaming => pb::PubsubSubscriptionType::Streaming,
                } as i32,
            })
            .collect(),
        app_connection_properties: Some(pb::AppConnectionProperties {
            port: i32::from(app.port),
            protocol: app.protocol.as_str().to_string(),
            channel_address: app.channel_address.clone(),
            max_concurrency: i32::try_from(app.max_concurrency).unwrap_or(i32::MAX),
            health: app
                .health
                .as_ref()
                .map(|h| pb::AppConnectionHealthProperties {
                    health_check_path: h.path.clone(),
                    health_probe_interval: daprd_core::duration::format_go_duration(h.interval),
                    health_probe_timeout: daprd_core::duration::format_go_duration(h.timeout),
                    health_threshold: i32::try_from(h.threshold).unwrap_or(i32::MAX),
                }),
        }),
        runtime_version: RUNTIME_VERSION.to_string(),
        enabled_features: Vec::new(),
        actor_runtime: Some(pb::ActorRuntime {
            runtime_status: pb::actor_runtime::ActorRuntimeStatus::Disabled as i32,
            active_actors: Vec::new(),
            host_ready: false,
            placement: String::new(),
        }),
        ..Default::default()
    }
}

fn put_nonempty(m: &mut Map<String, Value>, k: &str, v: &str) {
    if !v.is_empty() {
        m.insert(k.into(), v.into());
    }
}

fn put_nonzero(m: &mut Map<String, Value>, k: &str, v: i32) {
    if v != 0 {
        m.insert(k.into(), v.into());
    }
}

/// The HTTP JSON form of `md` (Dapr's field names; empty fields omitted; rules flat).
pub fn to_http_json(md: &pb::GetMetadataResponse) -> Value {
    let mut out = Map::new();
    put_nonempty(&mut out, "id", &md.id);
    put_nonempty(&mut out, "runtimeVersion", &md.runtime_version);
    if !md.enabled_features.is_empty() {
        out.insert("enabledFeatures".into(), json!(md.enabled_features));
    }
    if !md.registered_components.is_empty() {
        let comps: Vec<Value> = md
            .registered_components
            .iter()
            .map(|c| {
                let mut m = Map::new();
                put_nonempty(&mut m, "name", &c.name);
                put_nonempty(&mut m, "type", &c.r#type);
                put_nonempty(&mut m, "version", &c.version);
                if !c.capabilities.is_empty() {
                    m.insert("capabilities".into(), json!(c.capabilities));
                }
                Value::Object(m)
            })
            .collect();
        out.insert("components".into(), Value::Array(comps));
    }
    if !md.extended_metadata.is_empty() {
        let ext: Map<String, Value> = md
            .extended_metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        out.insert("extended".into(), Value::Object(ext));
    }
    if !md.subscriptions.is_empty() {
        let subs: Vec<Value> = md
            .subscriptions
            .iter()
            .map(|s| {
                let mut m = Map::new();
                m.insert("pubsubname".into(), s.pubsub_name.clone().into());
                m.insert("topic".into(), s.topic.clone().into());
                if !s.metadata.is_empty() {
                    m.insert("metadata".into(), json!(s.metadata));
                }
                if let Some(rules) = s.rules.as_ref().filter(|r| !r.rules.is_empty()) {
                    let rules: Vec<Value> = rules
                        .rules
                        .iter()
                        .map(|r| {
                            let mut rm = Map::new();
                            put_nonempty(&mut rm, "match", &r.r#match);
                            put_nonempty(&mut rm, "path", &r.path);
                            Value::Object(rm)
                        })
                        .collect();
                    m.insert("rules".into(), Value::Array(rules));
                }
                m.insert("deadLetterTopic".into(), s.dead_letter_topic.clone().into());
                let ty = pb::PubsubSubscriptionType::try_from(s.r#type)
                    .unwrap_or(pb::PubsubSubscriptionType::Unknown);
                m.insert("type".into(), ty.as_str_name().into());
                Value::Object(m)
            })
            .collect();
        out.insert("subscriptions".into(), Value::Array(subs));
    }
    if let Some(app) = &md.app_connection_properties {
        let mut m = Map::new();
        put_nonzero(&mut m, "port", app.port);
        put_nonempty(&mut m, "protocol", &app.protocol);
        put_nonempty(&mut m, "channelAddress", &app.channel_address);
        put_nonzero(&mut m, "maxConcurrency", app.max_concurrency);
        if let Some(h) = &app.health {
            let mut hm = Map::new();
            put_nonempty(&mut hm, "healthCheckPath", &h.health_check_path);
            put_nonempty(&mut hm, "healthProbeInterval", &h.health_probe_interval);
            put_nonempty(&mut hm, "healthProbeTimeout", &h.health_probe_timeout);
            put_nonzero(&mut hm, "healthThreshold", h.health_threshold);
            m.insert("health".into(), Value::Object(hm));
        }
        if !m.is_empty() {
            out.insert("appConnectionProperties".into(), Value::Object(m));
        }
    }
    let actor = md.actor_runtime.clone().unwrap_or_default();
    let status = pb::actor_runtime::ActorRuntimeStatus::try_from(actor.runtime_status)
        .unwrap_or(pb::actor_runtime::ActorRuntimeStatus::Initializing);
    let mut am = Map::new();
    am.insert("runtimeStatus".into(), status.as_str_name().into());
    am.insert("hostReady".into(), actor.host_ready.into());
    put_nonempty(&mut am, "placement", &actor.placement);
    out.insert("actorRuntime".into(), Value::Object(am));
    Value::Object(out)
}
