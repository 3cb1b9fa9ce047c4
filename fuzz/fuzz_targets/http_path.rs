//! The HTTP API's Go-compatible path cleaning and query decoding, and the publish path split.
#![no_main]

use daprd_core::gocompat::{go_path_clean, query_unescape};
use daprd_runtime::api::http::request_metadata;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let cleaned = go_path_clean(&text);
    // Cleaning is idempotent, as Go's path.Clean.
    assert_eq!(go_path_clean(&cleaned), cleaned);
    let _ = query_unescape(&text);
    let _ = request_metadata(Some(&text));
});
