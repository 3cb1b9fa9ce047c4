//! Go standard-library behaviour that Dapr's answers depend on, written once: URL path
//! cleaning (`path.Clean`), query unescaping (`url.QueryUnescape`) and header-name
//! canonicalisation (`http.CanonicalHeaderKey`).

/// Go's `path.Clean` for an absolute URL path.
pub fn go_path_clean(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Go's `url.QueryUnescape`: `%XX` escapes and `+` for a space; `None` for a bad escape or
/// bytes that are not UTF-8.
pub fn query_unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Go's `url.QueryEscape`: unreserved bytes as they are, a space as `+`, the rest `%XX`.
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Go's `http.CanonicalHeaderKey`: `x-my-header` → `X-My-Header`; a key with a byte that is
/// not a token character is returned unchanged.
pub fn canonical_header(key: &str) -> String {
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        return key.to_string();
    }
    let mut upper = true;
    key.chars()
        .map(|c| {
            let out = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_escape_like_go() {
        assert_eq!(query_escape("a b/c?d=é~"), "a+b%2Fc%3Fd%3D%C3%A9~");
        assert_eq!(
            query_unescape(&query_escape("x y/é")).as_deref(),
            Some("x y/é")
        );
    }

    #[test]
    fn path_clean_like_go() {
        assert_eq!(go_path_clean("/v1.0//publish/ps/t/"), "/v1.0/publish/ps/t");
        assert_eq!(
            go_path_clean("/v1.0/publish/ps/./a/../b"),
            "/v1.0/publish/ps/b"
        );
        assert_eq!(go_path_clean("/"), "/");
        assert_eq!(go_path_clean("/a/%2F/b"), "/a/%2F/b");
    }

    #[test]
    fn unescape_like_go_query_unescape() {
        assert_eq!(query_unescape("a%2Fb+c%23").as_deref(), Some("a/b c#"));
        assert_eq!(query_unescape("%zz"), None);
        assert_eq!(query_unescape("%4"), None);
    }

    #[test]
    fn canonical_header_names_like_go() {
        assert_eq!(canonical_header("pubsubName"), "Pubsubname");
        assert_eq!(canonical_header("x-my-header"), "X-My-Header");
        assert_eq!(canonical_header("__key"), "__key");
        assert_eq!(canonical_header("with space"), "with space");
    }
}
