//! JSON encoding that matches Go's `encoding/json`: object keys sorted (serde_json's
//! default map is ordered), `<`, `>`, `&`, U+2028 and U+2029 escaped as `\uXXXX`.

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter, Serializer};
use std::io;

struct GoFormatter;

impl Formatter for GoFormatter {
    fn write_string_fragment<W>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        // Only '<', '>', '&' and the UTF-8 lead byte 0xE2 of U+2028/U+2029 matter; jump
        // between them with memchr (SIMD) instead of visiting every byte.
        let bytes = fragment.as_bytes();
        let next_special = |from: usize| -> usize {
            let rest = &bytes[from..];
            let html = memchr::memchr3(b'<', b'>', b'&', rest).unwrap_or(rest.len());
            from + memchr::memchr(0xE2, &rest[..html]).unwrap_or(html)
        };
        let mut start = 0;
        let mut i = next_special(0);
        while i < bytes.len() {
            let (escape, len) = match bytes[i] {
                b'<' => ("\\u003c", 1),
                b'>' => ("\\u003e", 1),
                b'&' => ("\\u0026", 1),
                0xE2 if bytes.get(i + 1) == Some(&0x80) && bytes.get(i + 2) == Some(&0xA8) => {
                    ("\\u2028", 3)
                }
                0xE2 if bytes.get(i + 1) == Some(&0x80) && bytes.get(i + 2) == Some(&0xA9) => {
                    ("\\u2029", 3)
                }
                _ => {
                    i = next_special(i + 1);
                    continue;
                }
            };
            writer.write_all(&bytes[start..i])?;
            writer.write_all(escape.as_bytes())?;
            i += len;
            start = i;
            i = next_special(i);
        }
        writer.write_all(&bytes[start..])
    }

    fn write_char_escape<W>(&mut self, writer: &mut W, char_escape: CharEscape) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        // Go writes control characters other than \n \r \t as \u00XX and never uses \b or \f.
        let s: String = match char_escape {
            CharEscape::Quote => "\\\"".into(),
            CharEscape::ReverseSolidus => "\\\\".into(),
            CharEscape::LineFeed => "\\n".into(),
            CharEscape::CarriageReturn => "\\r".into(),
            CharEscape::Tab => "\\t".into(),
            CharEscape::Backspace => "\\u0008".into(),
            CharEscape::FormFeed => "\\u000c".into(),
            CharEscape::AsciiControl(b) => format!("\\u{b:04x}"),
            _ => return Err(io::Error::other("unknown json escape")),
        };
        writer.write_all(s.as_bytes())
    }
}

/// Serialises `value` as compact JSON, byte for byte as Go's `json.Marshal` would.
///
/// # Errors
/// Whatever `serde_json` reports for an unserialisable value.
pub fn to_vec_go<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(256);
    let mut ser = Serializer::with_formatter(&mut out, GoFormatter);
    value.serialize(&mut ser)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn escapes_html_and_sorts_keys() {
        let v = json!({"b": "<a&b>", "a": 1});
        assert_eq!(
            String::from_utf8(to_vec_go(&v).unwrap()).unwrap(),
            r#"{"a":1,"b":"\u003ca\u0026b\u003e"}"#
        );
    }

    #[test]
    fn escapes_controls_like_go() {
        let v = json!("a\u{1}\u{8}\n\u{2028}é");
        assert_eq!(
            String::from_utf8(to_vec_go(&v).unwrap()).unwrap(),
            "\"a\\u0001\\u0008\\n\\u2028é\""
        );
    }

    #[test]
    fn other_three_byte_characters_pass_through() {
        let v = json!("\u{2029}\u{2713}\u{20ac}<");
        assert_eq!(
            String::from_utf8(to_vec_go(&v).unwrap()).unwrap(),
            "\"\\u2029\u{2713}\u{20ac}\\u003c\""
        );
    }

    #[test]
    fn keeps_numbers_exact() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"n":12345678901234567890123,"f":1.50}"#).unwrap();
        assert_eq!(
            String::from_utf8(to_vec_go(&v).unwrap()).unwrap(),
            r#"{"f":1.50,"n":12345678901234567890123}"#
        );
    }
}
