//! The bulk publish body decoder (entry by entry) on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = daprd_runtime::api::http::parse_bulk_entries(data, "pubsub", "topic", "app");
});
