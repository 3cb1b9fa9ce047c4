//! CEL routing rules: compiling an arbitrary `match` and evaluating it against an event.
#![no_main]

use daprd_runtime::inbound::routing::{json_to_cel, Rule};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(rule) = Rule::new(&text, "/p") {
        let event = serde_json::json!({
            "id": "1", "type": "t", "source": "s", "specversion": "1.0",
            "data": {"n": 1, "s": "x", "l": [1, 2]}
        });
        let _ = rule.matches(&json_to_cel(&event));
    }
});
