//! Shared access signatures: the tokens a namespace's key signs, for `$cbs` and for the
//! management API alike.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

/// How long a SAS token is valid; tokens are put again well before.
pub(super) const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// A SAS token for `resource` valid until `expiry` (seconds since the epoch), signed with the
/// key's text as Azure does: `sr` and `sig` query-escaped as Go's `url.QueryEscape`.
pub(super) fn sas_token(resource: &str, key_name: &str, key: &str, expiry: u64) -> String {
    let sr = daprd_core::gocompat::query_escape(resource);
    let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    let sig = ring::hmac::sign(&hmac_key, format!("{sr}\n{expiry}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(sig.as_ref());
    format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}&skn={key_name}",
        daprd_core::gocompat::query_escape(&sig)
    )
}

/// Seconds since the epoch.
pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sas_tokens_sign_the_escaped_resource_and_expiry() {
        let t = sas_token("amqps://ns.example/topic", "Root", "key", 1_700_000_000);
        assert!(t.starts_with("SharedAccessSignature sr=amqps%3A%2F%2Fns.example%2Ftopic&sig="));
        assert!(t.ends_with("&se=1700000000&skn=Root"), "{t}");
        // HMAC-SHA256("key", "amqps%3A%2F%2Fns.example%2Ftopic\n1700000000"), base64
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"key");
        let sig = ring::hmac::sign(&key, b"amqps%3A%2F%2Fns.example%2Ftopic\n1700000000");
        let sig = base64::engine::general_purpose::STANDARD.encode(sig.as_ref());
        assert!(t.contains(&format!(
            "sig={}&",
            daprd_core::gocompat::query_escape(&sig)
        )));
    }
}
