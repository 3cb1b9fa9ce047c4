//! The resources loader on arbitrary YAML: components, subscriptions, resiliency and the
//! Configuration parsed and checked; every problem is an error entry, never a panic.
#![no_main]

use std::path::Path;

use daprd_runtime::config::resources::{parse_file, LoadContext, Resources};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ctx = LoadContext {
        app_id: "app",
        namespace: None,
    };
    let mut out = Resources::default();
    parse_file(Path::new("fuzz.yaml"), data, &ctx, &mut out);
    let _ = daprd_runtime::inbound::subscriptions::parse_declarative(&out.others);
    let _ = daprd_runtime::resiliency::Resiliency::load(&out.others, "app");
    let text = String::from_utf8_lossy(data);
    let _ = daprd_runtime::config::configuration::read(Path::new("fuzz.yaml"), &text);
});
