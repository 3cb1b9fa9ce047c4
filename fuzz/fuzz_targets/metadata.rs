//! Every registered component's metadata validation on arbitrary key/value pairs.
#![no_main]

use daprd_core::Metadata;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Lines of `key=value`; the keys are the components' own names where a line starts
    // with a digit (so values reach the real parsers).
    const KEYS: &[&str] = &[
        "redisHost",
        "processingTimeout",
        "redeliverInterval",
        "concurrency",
        "queueDepth",
        "connectionString",
        "prefetchCount",
        "reconnectWaitSeconds",
        "ttlInSeconds",
        "url",
        "qos",
        "natsURL",
        "ackWait",
        "maxDeliver",
        "brokers",
        "authType",
        "consumerGroup",
        "initialOffset",
        "backOffDuration",
        "endpoint",
        "region",
        "messageVisibilityTimeout",
        "consumerID",
        "caCert",
        "clientCert",
        "clientKey",
        "durableName",
        "maxLen",
        "sessionTimeout",
        "version",
        "fifo",
        "concurrencyMode",
        "enableTLS",
    ];
    let mut md = Metadata::new();
    for line in text.lines() {
        let (k, v) = line.split_once('=').unwrap_or((line, ""));
        let key = match k.as_bytes().first() {
            Some(d) if d.is_ascii_digit() => KEYS[usize::from(*d) % KEYS.len()],
            _ => k,
        };
        md.insert(key, v);
    }
    let registry = daprd_components::builtin_registry();
    for ty in registry.available() {
        if let Ok(daprd_core::registry::Factory::PubSub(f)) = registry.resolve(ty, "v1") {
            let _ = f.validate(&md);
        }
    }
});
