//! Event Hubs on the test broker (a namespace serves both, as an Azure namespace's AMQP
//! endpoint does): event hubs made by [`TestBroker::event_hub`] with a number of partitions,
//! each an append-only log. A client sends to `<hub>` (the partition is chosen by the
//! message's `x-opt-partition-key` annotation, else in turn) or to `<hub>/Partitions/<id>`;
//! each stored event gets `x-opt-sequence-number` (from 0 in each partition), `x-opt-offset`
//! (its sequence number as text: offsets are opaque to clients), `x-opt-enqueued-time` and the
//! partition key it was sent with. A receiver of
//! `<hub>/ConsumerGroups/<group>/Partitions/<id>` gets the partition's events, settled, as its
//! credit allows, from where its source's `apache.org:selector-filter:string` says:
//! `amqp.annotation.x-opt-offset` or `amqp.annotation.x-opt-sequence-number` with `>` or `>=`
//! (offset `'-1'`: the start, `'@latest'`: only new events) or
//! `amqp.annotation.x-opt-enqueued-time >` milliseconds; with no filter, only new events.
//! `READ` on the namespace's `$management` node (of an event hub nobody made: made then, with
//! [`DEFAULT_PARTITIONS`], unless [`TestBroker::require_existing_entities`]) answers an event hub's `partition_ids` (type
//! `com.microsoft:eventhub`) or a partition's last sequence number and offset (type
//! `com.microsoft:partition`). Consumer groups are not kept apart (each receiver reads
//! from its own position, which is all a consumer group is to the service), epochs are not
//! enforced. `start_persistent` keeps event hubs and their events too.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::link::Sender;
use fe2o3_amqp::types::definitions;
use fe2o3_amqp::types::messaging::{Body, MessageAnnotations};
use fe2o3_amqp::types::primitives::{Array, OrderedMap, SimpleValue, Symbol, Timestamp, Value};

use tokio::sync::watch;

use super::{lock, now_ms, symbol_key, AmqpMessage, Inner, TestBroker};

/// A receiver's epoch in its attach's properties.
const EPOCH: &str = "com.microsoft:epoch";

/// The epoch a receiver's attach asks for, if any.
pub(super) fn epoch_of(attach: &fe2o3_amqp::types::performatives::Attach) -> Option<i64> {
    match attach.properties.as_ref()?.get(&Symbol::from(EPOCH))? {
        Value::Long(n) => Some(*n),
        Value::Int(n) => Some(i64::from(*n)),
        Value::Ulong(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

/// The selector filter's name in a receiver's source.
const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";

/// The partitions of an event hub made by its first `READ`.
pub const DEFAULT_PARTITIONS: usize = 4;

/// One event hub: its partitions' events, in order.
#[derive(Default)]
pub(super) struct Hub {
    partitions: Vec<Vec<AmqpMessage>>,
    /// The partition the next event without a partition key goes to.
    next: usize,
    /// Receivers attached now.
    receivers: usize,
    /// Epoch receivers detached by a newer one (partitions taken over).
    takeovers: usize,
    /// Consumer groups made through Azure Resource Manager (`$Default` always exists).
    groups: std::collections::HashSet<String>,
    /// Its properties as Resource Manager was given them (`PUT`), if it was made there.
    arm: Option<String>,
    /// The epoch receiver of each (consumer group, partition), and what tells it it was
    /// replaced.
    holders: std::collections::HashMap<(String, usize), (u64, watch::Sender<bool>)>,
    created_ms: i64,
}

impl TestBroker {
    /// Makes the event hub `name` with `partitions` partitions (ids `0`, `1`, ...), unless it
    /// exists.
    pub fn event_hub(&self, name: &str, partitions: usize) {
        let mut s = lock(&self.inner.state);
        s.hubs
            .entry(name.to_ascii_lowercase())
            .or_insert_with(|| Hub {
                partitions: vec![Vec::new(); partitions.max(1)],
                created_ms: now_ms(),
                ..Hub::default()
            });
        self.inner.save(&s);
    }

    /// Every event of `hub`, as (partition, event with the broker's annotations), partition
    /// by partition.
    pub fn events(&self, hub: &str) -> Vec<(usize, AmqpMessage)> {
        let s = lock(&self.inner.state);
        s.hubs
            .get(&hub.to_ascii_lowercase())
            .map(|h| {
                h.partitions
                    .iter()
                    .enumerate()
                    .flat_map(|(p, events)| events.iter().map(move |e| (p, e.clone())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The consumer groups of `hub` made through Azure Resource Manager, and the properties
    /// the hub was made with there (if it was).
    pub fn arm_made(&self, hub: &str) -> (Vec<String>, Option<String>) {
        let s = lock(&self.inner.state);
        s.hubs
            .get(&hub.to_ascii_lowercase())
            .map_or((Vec::new(), None), |h| {
                let mut groups: Vec<String> = h.groups.iter().cloned().collect();
                groups.sort();
                (groups, h.arm.clone())
            })
    }

    /// How many times a partition receiver of `hub` was detached because a newer one (with an
    /// epoch) took its partition over.
    pub fn event_takeovers(&self, hub: &str) -> usize {
        lock(&self.inner.state)
            .hubs
            .get(&hub.to_ascii_lowercase())
            .map_or(0, |h| h.takeovers)
    }

    /// How many partition receivers of `hub` are attached now.
    pub fn event_receivers(&self, hub: &str) -> usize {
        lock(&self.inner.state)
            .hubs
            .get(&hub.to_ascii_lowercase())
            .map_or(0, |h| h.receivers)
    }
}

/// Where a client's sender link to `address` puts events: (hub, partition if named).
pub(super) fn send_target(inner: &Inner, address: &str) -> Option<(String, Option<usize>)> {
    let lower = address.to_ascii_lowercase();
    let (hub, partition) = match lower.split_once("/partitions/") {
        Some((hub, p)) => (hub.to_string(), Some(p.parse::<usize>().ok()?)),
        None => (lower, None),
    };
    lock(&inner.state)
        .hubs
        .contains_key(&hub)
        .then_some((hub, partition))
}

/// The (hub, consumer group, partition) a receiver link of `address` reads.
pub(super) fn receive_source(inner: &Inner, address: &str) -> Option<(String, String, usize)> {
    let lower = address.to_ascii_lowercase();
    let (hub, rest) = lower.split_once("/consumergroups/")?;
    let (group, partition) = rest.split_once("/partitions/")?;
    let partition = partition.parse::<usize>().ok()?;
    let s = lock(&inner.state);
    let h = s.hubs.get(hub)?;
    // strict (as Event Hubs): a consumer group nobody made is not found
    if s.strict && group != "$default" && !h.groups.contains(group) {
        return None;
    }
    (partition < h.partitions.len()).then(|| (hub.to_string(), group.to_string(), partition))
}

/// The message format of a batch: each data section is an encoded event.
const BATCH_FORMAT: u32 = 0x8001_3700;

/// The events a received message carries: itself, or those of a batch. The batch's partition
/// key annotation applies to each of its events.
pub(super) fn unbatch(format: Option<u32>, message: &AmqpMessage) -> Vec<AmqpMessage> {
    use fe2o3_amqp::types::messaging::message::__private::Deserializable;
    let Body::Data(sections) = &message.body else {
        return vec![message.clone()];
    };
    if format != Some(BATCH_FORMAT) {
        return vec![message.clone()];
    }
    let key = annotation(message, "x-opt-partition-key").cloned();
    sections
        .iter()
        .filter_map(|data| {
            let Deserializable(mut event): Deserializable<AmqpMessage> =
                serde_amqp::from_slice(&data.0).ok()?;
            if let Some(k) = &key {
                let annotations = event
                    .message_annotations
                    .get_or_insert_with(|| MessageAnnotations(OrderedMap::new()));
                if annotations
                    .0
                    .get(&symbol_key("x-opt-partition-key"))
                    .is_none()
                {
                    annotations
                        .0
                        .insert(symbol_key("x-opt-partition-key"), k.clone());
                }
            }
            Some(event)
        })
        .collect()
}

/// Appends `message` to `hub` (its `partition`, else the key's or the next one), with the
/// broker's annotations.
pub(super) fn append(inner: &Inner, hub: &str, partition: Option<usize>, mut message: AmqpMessage) {
    let annotations = message
        .message_annotations
        .get_or_insert_with(|| MessageAnnotations(OrderedMap::new()));
    let key = annotations
        .0
        .get(&symbol_key("x-opt-partition-key"))
        .and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            _ => None,
        });
    let mut s = lock(&inner.state);
    let Some(h) = s.hubs.get_mut(hub) else {
        return;
    };
    let count = h.partitions.len();
    let p = match (partition, key) {
        (Some(p), _) => p.min(count - 1),
        (None, Some(k)) => {
            // a stable hash, so that one key always lands in one partition
            let hash = k.bytes().fold(2_166_136_261u32, |h, b| {
                (h ^ u32::from(b)).wrapping_mul(16_777_619)
            });
            usize::try_from(hash).unwrap_or(0) % count
        }
        (None, None) => {
            h.next = (h.next + 1) % count;
            h.next
        }
    };
    let sequence = i64::try_from(h.partitions[p].len()).unwrap_or(i64::MAX);
    annotations
        .0
        .insert(symbol_key("x-opt-sequence-number"), Value::Long(sequence));
    annotations.0.insert(
        symbol_key("x-opt-offset"),
        Value::String(sequence.to_string()),
    );
    annotations.0.insert(
        symbol_key("x-opt-enqueued-time"),
        Value::Timestamp(Timestamp::from_milliseconds(now_ms())),
    );
    h.partitions[p].push(message);
    inner.save(&s);
    drop(s);
    inner.available.notify_waiters();
}

/// Where a receiver starts: the sequence number of its first event.
fn start_of(
    inner: &Inner,
    hub: &str,
    partition: usize,
    filter: Option<&str>,
) -> Result<i64, String> {
    let s = lock(&inner.state);
    let events = s
        .hubs
        .get(hub)
        .map_or(&[][..], |h| &h.partitions[partition][..]);
    let end = i64::try_from(events.len()).unwrap_or(i64::MAX);
    let Some(filter) = filter else {
        return Ok(end);
    };
    let bad = || format!("unsupported selector filter {filter:?}");
    let (field, rest) = filter.trim().split_once(' ').ok_or_else(bad)?;
    let (op, value) = rest.trim().split_once(' ').ok_or_else(bad)?;
    let value = value.trim().trim_matches('\'');
    let inclusive = match op {
        ">" => false,
        ">=" => true,
        _ => return Err(bad()),
    };
    let after = |n: i64| if inclusive { n } else { n + 1 };
    match field {
        "amqp.annotation.x-opt-offset" | "amqp.annotation.x-opt-sequence-number" => match value {
            "@latest" => Ok(end),
            v => {
                let n: i64 = v.parse().map_err(|_| bad())?;
                Ok(if n < 0 { 0 } else { after(n) })
            }
        },
        "amqp.annotation.x-opt-enqueued-time" => {
            let ms: i64 = value.parse().map_err(|_| bad())?;
            let first = events.iter().position(|e| {
                let t = annotation(e, "x-opt-enqueued-time").and_then(|v| match v {
                    Value::Timestamp(t) => Some(t.milliseconds()),
                    _ => None,
                });
                t.is_some_and(|t| if inclusive { t >= ms } else { t > ms })
            });
            Ok(first.map_or(end, |i| i64::try_from(i).unwrap_or(i64::MAX)))
        }
        _ => Err(bad()),
    }
}

/// A link's id among a hub's holders.
fn next_link_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn annotation<'a>(m: &'a AmqpMessage, key: &str) -> Option<&'a Value> {
    m.message_annotations.as_ref()?.0.get(&symbol_key(key))
}

/// The selector filter of a receiver's source, if any.
fn selector(s: &Sender) -> Option<String> {
    let source = s.source().as_ref()?;
    let v = source
        .filter
        .as_ref()?
        .get(&Symbol::from(SELECTOR_FILTER))?;
    match v {
        Value::Described(d) => match &d.value {
            Value::String(s) => Some(s.clone()),
            _ => None,
        },
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Streams a partition's events to a receiver link, settled, as its credit allows. A receiver
/// with an epoch replaces the group's last one on the partition, which is detached with
/// `amqp:link:stolen` (as Event Hubs does when a processor takes a partition over).
pub(super) async fn stream(
    inner: Arc<Inner>,
    mut s: Sender,
    (hub, group, partition): (String, String, usize),
    epoch: Option<i64>,
) {
    let mut next = match start_of(&inner, &hub, partition, selector(&s).as_deref()) {
        Ok(n) => n,
        Err(why) => {
            let e =
                definitions::Error::new(definitions::AmqpError::NotImplemented, Some(why), None);
            let _ = s.close_with_error(e).await;
            return;
        }
    };
    let counted = Counted::new(&inner, &hub);
    let (kick, mut kicked) = watch::channel(false);
    let id = next_link_id();
    if epoch.is_some() {
        let mut st = lock(&inner.state);
        if let Some(h) = st.hubs.get_mut(&hub) {
            if let Some((_, old)) = h.holders.insert((group.clone(), partition), (id, kick)) {
                let _ = old.send(true);
                h.takeovers += 1;
            }
        }
    }
    loop {
        if *kicked.borrow() {
            let e = definitions::Error::new(
                definitions::LinkError::Stolen,
                Some(format!(
                    "a new receiver with epoch {} took partition {partition} of {hub}",
                    epoch.unwrap_or(0)
                )),
                None,
            );
            let _ = s.close_with_error(e).await;
            break;
        }
        let notified = inner.available.notified();
        let event = {
            let st = lock(&inner.state);
            st.hubs
                .get(&hub)
                .and_then(|h| {
                    h.partitions[partition].get(usize::try_from(next).unwrap_or(usize::MAX))
                })
                .cloned()
        };
        let Some(event) = event else {
            tokio::select! {
                _ = tokio::time::timeout(Duration::from_millis(100), notified) => {}
                _ = kicked.changed() => {}
                _ = s.on_detach() => break,
            }
            continue;
        };
        if s.send(event).await.is_err() {
            break;
        }
        next += 1;
    }
    if epoch.is_some() {
        let mut st = lock(&inner.state);
        if let Some(h) = st.hubs.get_mut(&hub) {
            let key = (group, partition);
            if h.holders.get(&key).is_some_and(|(holder, _)| *holder == id) {
                h.holders.remove(&key);
            }
        }
    }
    drop(counted);
}

/// Counts a receiver of a hub while it lives.
struct Counted<'a> {
    inner: &'a Inner,
    hub: String,
}

impl<'a> Counted<'a> {
    fn new(inner: &'a Inner, hub: &str) -> Self {
        if let Some(h) = lock(&inner.state).hubs.get_mut(hub) {
            h.receivers += 1;
        }
        Self {
            inner,
            hub: hub.to_string(),
        }
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        if let Some(h) = lock(&self.inner.state).hubs.get_mut(&self.hub) {
            h.receivers = h.receivers.saturating_sub(1);
        }
    }
}

/// Answers a request to the namespace's `$management` node: (status-code, body).
pub(super) fn management(
    inner: &Inner,
    request: &AmqpMessage,
    authorized: impl Fn(&str) -> bool,
) -> (i32, Value) {
    let prop = |k: &str| {
        request
            .application_properties
            .as_ref()
            .and_then(|a| a.0.get(k))
            .and_then(|v| match v {
                SimpleValue::String(s) => Some(s.clone()),
                _ => None,
            })
    };
    if prop("operation").as_deref() != Some("READ") {
        return (501, Value::Null);
    }
    let Some(name) = prop("name") else {
        return (400, Value::Null);
    };
    if !authorized(&name) {
        return (401, Value::Null);
    }
    let mut s = lock(&inner.state);
    let key = name.to_ascii_lowercase();
    if !s.strict && prop("type").as_deref() == Some("com.microsoft:eventhub") {
        // as entities come into being when first named: an event hub when first read
        if !s.hubs.contains_key(&key) {
            s.hubs.insert(
                key.clone(),
                Hub {
                    partitions: vec![Vec::new(); DEFAULT_PARTITIONS],
                    created_ms: now_ms(),
                    ..Hub::default()
                },
            );
            inner.save(&s);
        }
    }
    let Some(h) = s.hubs.get(&key) else {
        return (404, Value::Null);
    };
    let mut body = OrderedMap::new();
    let mut put = |k: &str, v: Value| {
        body.insert(Value::String(k.into()), v);
    };
    put("name", Value::String(name.clone()));
    match prop("type").as_deref() {
        Some("com.microsoft:eventhub") => {
            put("type", Value::String("com.microsoft:eventhub".into()));
            put(
                "created_at",
                Value::Timestamp(Timestamp::from_milliseconds(h.created_ms)),
            );
            put(
                "partition_count",
                Value::Int(i32::try_from(h.partitions.len()).unwrap_or(i32::MAX)),
            );
            put(
                "partition_ids",
                Value::Array(Array(
                    (0..h.partitions.len())
                        .map(|p| Value::String(p.to_string()))
                        .collect(),
                )),
            );
        }
        Some("com.microsoft:partition") => {
            let Some(events) = prop("partition")
                .and_then(|p| p.parse::<usize>().ok())
                .and_then(|p| h.partitions.get(p))
            else {
                return (404, Value::Null);
            };
            let last = i64::try_from(events.len()).unwrap_or(i64::MAX) - 1;
            put("type", Value::String("com.microsoft:partition".into()));
            put("last_enqueued_sequence_number", Value::Long(last));
            put("last_enqueued_offset", Value::String(last.to_string()));
            put("is_partition_empty", Value::Bool(events.is_empty()));
        }
        _ => return (400, Value::Null),
    }
    (200, Value::Map(body))
}

/// The event hubs as JSON (each event as its AMQP encoding in base64), for `start_persistent`.
pub(super) fn dump(hubs: &std::collections::HashMap<String, Hub>) -> serde_json::Value {
    use base64::Engine as _;
    use fe2o3_amqp::types::messaging::message::__private::Serializable;
    let b64 = base64::engine::general_purpose::STANDARD;
    hubs.iter()
        .map(|(name, h)| {
            let partitions: Vec<Vec<String>> = h
                .partitions
                .iter()
                .map(|events| {
                    events
                        .iter()
                        .map(|e| {
                            b64.encode(
                                serde_amqp::to_vec(&Serializable(e.clone())).unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .collect();
            let value = serde_json::json!({
                "partitions": partitions,
                "next": h.next,
                "created_ms": h.created_ms,
                "groups": h.groups.iter().collect::<Vec<_>>(),
                "arm": h.arm,
            });
            (name.clone(), value)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The event hubs [`dump`] wrote.
pub(super) fn load(
    v: &serde_json::Value,
) -> Result<std::collections::HashMap<String, Hub>, String> {
    use base64::Engine as _;
    use fe2o3_amqp::types::messaging::message::__private::Deserializable;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut hubs = std::collections::HashMap::new();
    for (name, h) in v.as_object().into_iter().flatten() {
        let mut partitions = Vec::new();
        for events in h["partitions"].as_array().into_iter().flatten() {
            let mut list = Vec::new();
            for e in events.as_array().into_iter().flatten() {
                let bytes = b64
                    .decode(e.as_str().ok_or("an event that is not text")?)
                    .map_err(|e| e.to_string())?;
                let Deserializable(m): Deserializable<AmqpMessage> =
                    serde_amqp::from_slice(&bytes).map_err(|e| e.to_string())?;
                list.push(m);
            }
            partitions.push(list);
        }
        if partitions.is_empty() {
            return Err(format!("event hub {name} has no partitions"));
        }
        hubs.insert(
            name.clone(),
            Hub {
                partitions,
                next: usize::try_from(h["next"].as_u64().unwrap_or_default()).unwrap_or(0),
                created_ms: h["created_ms"].as_i64().unwrap_or_default(),
                groups: h["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|g| g.as_str().map(str::to_string))
                    .collect(),
                arm: h["arm"].as_str().map(str::to_string),
                ..Hub::default()
            },
        );
    }
    Ok(hubs)
}

/// Azure Resource Manager's Event Hubs API, as Go daprd's entity management uses it (a bearer
/// token checked as the management API's): `GET`/`PUT`
/// `/subscriptions/<s>/resourceGroups/<g>/providers/Microsoft.EventHub/namespaces/<ns>/eventhubs/<hub>`
/// (a `PUT` makes the hub with its `properties.partitionCount`) and
/// `.../eventhubs/<hub>/consumergroups/<group>`; (status, JSON body).
pub(super) fn arm(inner: &Inner, request: &crate::http1::Request) -> (&'static str, String) {
    let error = |status: &'static str, code: &str, message: &str| {
        (
            status,
            serde_json::json!({"error": {"code": code, "message": message}}).to_string(),
        )
    };
    let token = request
        .header("authorization")
        .unwrap_or_default()
        .strip_prefix("Bearer ")
        .unwrap_or_default();
    if let Err(why) = inner.check_jwt(token) {
        return error("401 Unauthorized", "InvalidAuthenticationToken", &why);
    }
    let path = request.path.to_ascii_lowercase();
    let Some((_, rest)) = path.split_once("/providers/microsoft.eventhub/namespaces/") else {
        return error("404 Not Found", "NotFound", "not an Event Hubs resource");
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let mut s = lock(&inner.state);
    match parts.as_slice() {
        [_ns, "eventhubs", hub] => {
            let hub = (*hub).to_string();
            match request.method.as_str() {
                "GET" => match s.hubs.get(&hub) {
                    Some(h) => ("200 OK", hub_json(&hub, h)),
                    None => error("404 Not Found", "NotFound", "the event hub does not exist"),
                },
                "PUT" => {
                    let body: serde_json::Value =
                        serde_json::from_str(&request.body).unwrap_or_default();
                    let partitions = body["properties"]["partitionCount"]
                        .as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .filter(|n| (1..=1024).contains(n))
                        .unwrap_or(DEFAULT_PARTITIONS);
                    let h = s.hubs.entry(hub.clone()).or_insert_with(|| Hub {
                        partitions: vec![Vec::new(); partitions],
                        created_ms: now_ms(),
                        ..Hub::default()
                    });
                    h.arm = Some(request.body.clone());
                    let answer = hub_json(&hub, h);
                    inner.save(&s);
                    ("200 OK", answer)
                }
                _ => error(
                    "405 Method Not Allowed",
                    "MethodNotAllowed",
                    &request.method,
                ),
            }
        }
        [_ns, "eventhubs", hub, "consumergroups", group] => {
            let Some(h) = s.hubs.get_mut(*hub) else {
                return error("404 Not Found", "NotFound", "the event hub does not exist");
            };
            let answer = serde_json::json!({"name": group, "properties": {}}).to_string();
            match request.method.as_str() {
                "GET" if h.groups.contains(*group) || *group == "$default" => ("200 OK", answer),
                "GET" => error(
                    "404 Not Found",
                    "NotFound",
                    "the consumer group does not exist",
                ),
                "PUT" => {
                    h.groups.insert((*group).to_string());
                    inner.save(&s);
                    ("200 OK", answer)
                }
                _ => error(
                    "405 Method Not Allowed",
                    "MethodNotAllowed",
                    &request.method,
                ),
            }
        }
        _ => error("404 Not Found", "NotFound", "no such resource"),
    }
}

fn hub_json(name: &str, h: &Hub) -> String {
    serde_json::json!({
        "name": name,
        "properties": {"partitionCount": h.partitions.len(), "status": "Active"},
    })
    .to_string()
}
