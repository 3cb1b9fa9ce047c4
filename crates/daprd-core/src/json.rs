//! JSON encoding that matches Go's `encoding/json`: object keys sorted (serde_json's
//! default map is ordered), `<`, `>`, `&`, U+2028 and U+2029 escaped as `\uXXXX`.

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter, Serializer};
use std::borrow::Cow;
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
        // Go (1.22 and later) writes \b \f \n \r \t short and other control characters as \u00XX.
        let s: String = match char_escape {
            CharEscape::Quote => "\\\"".into(),
            CharEscape::ReverseSolidus => "\\\\".into(),
            CharEscape::LineFeed => "\\n".into(),
            CharEscape::CarriageReturn => "\\r".into(),
            CharEscape::Tab => "\\t".into(),
            CharEscape::Backspace => "\\b".into(),
            CharEscape::FormFeed => "\\f".into(),
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

/// Writes `s` as a JSON string, escaped as Go's `encoding/json` escapes it.
pub fn write_go_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    loop {
        i = next_special(bytes, i);
        let Some(&b) = bytes.get(i) else {
            break;
        };
        let (escape, len): (&[u8], usize) = match b {
            b'"' => (b"\\\"", 1),
            b'\\' => (b"\\\\", 1),
            b'\n' => (b"\\n", 1),
            b'\r' => (b"\\r", 1),
            b'\t' => (b"\\t", 1),
            0x08 => (b"\\b", 1),
            0x0c => (b"\\f", 1),
            b'<' => (b"\\u003c", 1),
            b'>' => (b"\\u003e", 1),
            b'&' => (b"\\u0026", 1),
            0xE2 => match (bytes.get(i + 1), bytes.get(i + 2)) {
                (Some(0x80), Some(0xA8)) => (b"\\u2028", 3),
                (Some(0x80), Some(0xA9)) => (b"\\u2029", 3),
                _ => {
                    i += 1;
                    continue;
                }
            },
            _ => (&[], 1),
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        i += len;
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Whether a byte may need an escape: a control byte, `"`, `\\`, `<`, `>`, `&`, or the lead
/// byte of U+2028 / U+2029.
fn special(b: u8) -> bool {
    b < 0x20 || matches!(b, b'"' | b'\\' | b'<' | b'>' | b'&' | 0xE2)
}

/// The index of the first byte at or after `from` that [`special`] names (`bytes.len()` when
/// there is none): runs without one are skipped eight bytes at a time.
#[inline]
fn next_special(bytes: &[u8], mut i: usize) -> usize {
    while let Some(word) = bytes
        .get(i..i + 8)
        .and_then(|w| <[u8; 8]>::try_from(w).ok())
    {
        if word_has_special(u64::from_le_bytes(word)) {
            break;
        }
        i += 8;
    }
    while i < bytes.len() && !special(bytes[i]) {
        i += 1;
    }
    i.min(bytes.len())
}

/// Whether one of the eight bytes of `x` is a control byte, `"`, `\\`, `<`, `>`, `&` or 0xE2
/// (bit tricks that test all eight at once; exact, no false positive or negative).
fn word_has_special(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let has = |b: u8| has_zero(x ^ (ONES * u64::from(b)));
    let below_space = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
    (below_space | has(b'"') | has(b'\\') | has(b'<') | has(b'>') | has(b'&') | has(0xE2)) != 0
}

/// Nesting deeper than this is left to the tree path (serde_json stops at 128).
const MAX_DEPTH: usize = 100;

/// Appends to `out` the first JSON value of `data` as Go daprd re-encodes a JSON body:
/// `json.Decoder.UseNumber().Decode` into a tree, then `json.Marshal` — object keys sorted,
/// the last of duplicate keys kept, no whitespace, Go's string escapes, numbers verbatim —
/// in one pass, without building the tree. Returns false, with `out` as it was, when `data`
/// does not start with an object or array this pass takes (invalid JSON, a scalar at the
/// top, a lone surrogate, a number with an exponent, nesting deeper than 100): the caller
/// then decodes the tree, whose answer is the reference this pass is tested against.
pub fn reencode_go(data: &[u8], out: &mut Vec<u8>) -> bool {
    // The text is checked for UTF-8 once; strings are slices of it. Past an invalid byte
    // (which may follow the first value, and is then ignored) no string is taken.
    let text = match std::str::from_utf8(data) {
        Ok(text) => text,
        Err(e) => std::str::from_utf8(&data[..e.valid_up_to()]).unwrap_or_default(),
    };
    let mut r = Reader { text, data, pos: 0 };
    r.skip_ws();
    if !matches!(r.peek(), Some(b'{' | b'[')) {
        return false;
    }
    let mark = out.len();
    if r.value(out, 0).is_none() {
        out.truncate(mark);
        return false;
    }
    true
}

/// A one-pass JSON reader writing Go's encoding of what it reads.
struct Reader<'a> {
    /// The longest UTF-8 prefix of `data`.
    text: &'a str,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.data.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn value(&mut self, out: &mut Vec<u8>, depth: usize) -> Option<()> {
        self.skip_ws();
        match self.peek()? {
            b'{' => self.object(out, depth + 1),
            b'[' => self.array(out, depth + 1),
            b'"' => self.go_string(out).map(|_| ()),
            b't' => self.literal(out, b"true"),
            b'f' => self.literal(out, b"false"),
            b'n' => self.literal(out, b"null"),
            b'-' | b'0'..=b'9' => self.number(out),
            _ => None,
        }
    }

    fn literal(&mut self, out: &mut Vec<u8>, lit: &[u8]) -> Option<()> {
        let end = self.pos + lit.len();
        if self.data.get(self.pos..end)? != lit {
            return None;
        }
        self.pos = end;
        out.extend_from_slice(lit);
        Some(())
    }

    fn digits(&mut self) -> Option<()> {
        if !self.peek()?.is_ascii_digit() {
            return None;
        }
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        Some(())
    }

    /// A number, copied as written (Go's `json.Number` keeps its text).
    fn number(&mut self, out: &mut Vec<u8>) -> Option<()> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        if self.peek()? == b'0' {
            self.pos += 1;
        } else {
            self.digits()?;
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            // The tree rewrites an exponent (`1E5` as `1e+5`); leave such bodies to it.
            return None;
        }
        out.extend_from_slice(&self.data[start..self.pos]);
        Some(())
    }

    /// Reads the string whose opening quote is at `pos`, writes Go's encoding of it and
    /// returns its text. A string Go writes as it is written (no escape, no byte Go escapes)
    /// is found in one scan and copied whole.
    fn go_string(&mut self, out: &mut Vec<u8>) -> Option<Cow<'a, str>> {
        if let Some(end) = self.plain_string_end() {
            let text = self.text.get(self.pos + 1..end)?;
            out.extend_from_slice(&self.data[self.pos..=end]);
            self.pos = end + 1;
            return Some(Cow::Borrowed(text));
        }
        let s = self.string()?;
        write_go_str(out, &s);
        Some(s)
    }

    /// The closing quote's index of the string opening at `pos`, when no byte before it is
    /// special (see [`special`]); `None` otherwise.
    fn plain_string_end(&self) -> Option<usize> {
        let i = next_special(self.data, self.pos + 1);
        (*self.data.get(i)? == b'"').then_some(i)
    }

    /// The string whose opening quote is at `pos`, unescaped (borrowed when it has no escape).
    fn string(&mut self) -> Option<Cow<'a, str>> {
        let (data, text) = (self.data, self.text);
        let mut i = self.pos + 1;
        let mut owned: Option<String> = None;
        loop {
            let rest = data.get(i..)?;
            let j = memchr::memchr2(b'"', b'\\', rest)?;
            let raw = &rest[..j];
            if raw.iter().any(|&b| b < 0x20) {
                return None;
            }
            let raw = text.get(i..i + j)?;
            i += j;
            if data[i] == b'"' {
                self.pos = i + 1;
                return Some(match owned {
                    None => Cow::Borrowed(raw),
                    Some(mut s) => {
                        s.push_str(raw);
                        Cow::Owned(s)
                    }
                });
            }
            let s = owned.get_or_insert_with(String::new);
            s.push_str(raw);
            let escape = *data.get(i + 1)?;
            i += 2;
            s.push(match escape {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let hi = hex4(data.get(i..i + 4)?)?;
                    i += 4;
                    match hi {
                        0xD800..=0xDBFF => {
                            if data.get(i..i + 2)? != b"\\u" {
                                return None;
                            }
                            let lo = hex4(data.get(i + 2..i + 6)?)?;
                            if !(0xDC00..=0xDFFF).contains(&lo) {
                                return None;
                            }
                            i += 6;
                            char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))?
                        }
                        _ => char::from_u32(hi)?,
                    }
                }
                _ => return None,
            });
        }
    }

    fn object(&mut self, out: &mut Vec<u8>, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        let open = out.len();
        out.push(b'{');
        // Each member's key and where its `"key":value` lies in `out`.
        let mut members: Vec<(Cow<'a, str>, usize, usize)> = Vec::new();
        self.skip_ws();
        if self.peek()? == b'}' {
            self.pos += 1;
            out.push(b'}');
            return Some(());
        }
        loop {
            self.skip_ws();
            if self.peek()? != b'"' {
                return None;
            }
            if !members.is_empty() {
                out.push(b',');
            }
            let start = out.len();
            let key = self.go_string(out)?;
            self.skip_ws();
            if self.peek()? != b':' {
                return None;
            }
            self.pos += 1;
            out.push(b':');
            self.value(out, depth)?;
            members.push((key, start, out.len()));
            self.skip_ws();
            match self.peek()? {
                b',' => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    break;
                }
                _ => return None,
            }
        }
        if members.windows(2).any(|w| w[0].0 >= w[1].0) {
            // Go decodes into a map: keys come out sorted, the last of equal keys wins.
            let mut order: Vec<usize> = (0..members.len()).collect();
            order.sort_by(|&a, &b| members[a].0.cmp(&members[b].0).then(a.cmp(&b)));
            let body = out.split_off(open + 1);
            let mut first = true;
            for (n, &i) in order.iter().enumerate() {
                if order
                    .get(n + 1)
                    .is_some_and(|&next| members[next].0 == members[i].0)
                {
                    continue;
                }
                if !first {
                    out.push(b',');
                }
                first = false;
                let (_, start, end) = members[i];
                out.extend_from_slice(&body[start - open - 1..end - open - 1]);
            }
        }
        out.push(b'}');
        Some(())
    }

    fn array(&mut self, out: &mut Vec<u8>, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        out.push(b'[');
        self.skip_ws();
        if self.peek()? == b']' {
            self.pos += 1;
            out.push(b']');
            return Some(());
        }
        loop {
            self.value(out, depth)?;
            self.skip_ws();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    out.push(b',');
                }
                b']' => {
                    self.pos += 1;
                    out.push(b']');
                    return Some(());
                }
                _ => return None,
            }
        }
    }
}

fn hex4(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0u32, |n, &d| {
        let v = char::from(d).to_digit(16)?;
        Some(n * 16 + v)
    })
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
        // Go 1.22 and later write \b and \f short (before: \u0008, \u000c).
        let v = json!("a\u{1}\u{8}\u{c}\n\u{1f}\u{2028}é");
        assert_eq!(
            String::from_utf8(to_vec_go(&v).unwrap()).unwrap(),
            "\"a\\u0001\\b\\f\\n\\u001f\\u2028é\""
        );
    }

    #[test]
    fn the_word_test_finds_exactly_the_special_bytes() {
        let special = |b: u8| b < 0x20 || matches!(b, b'"' | b'\\' | b'<' | b'>' | b'&' | 0xE2);
        for b in 0..=255u8 {
            for at in 0..8 {
                // every other byte harmless, but from both ends of the range
                for filler in [b'x', 0x7f, 0xff, 0x20] {
                    let mut w = [filler; 8];
                    w[at] = b;
                    assert_eq!(
                        word_has_special(u64::from_le_bytes(w)),
                        special(b),
                        "byte {b:#x} at {at} among {filler:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_string_writer_escapes_as_the_formatter_does() {
        let specials = [
            "\"", "\\", "<", ">", "&", "\n", "\r", "\t", "\u{8}", "\u{c}", "\u{0}", "\u{1f}",
            "\u{7f}", "\u{2028}", "\u{2029}", "\u{2027}", "\u{20ac}", "é", "😀", "/",
        ];
        for special in specials {
            for at in [0, 1, 15, 16, 17, 31, 32, 40] {
                for len in [at, at + 1, 48] {
                    let mut s: String = "x".repeat(at);
                    s.push_str(special);
                    while s.len() < len {
                        s.push('y');
                    }
                    let mut out = Vec::new();
                    write_go_str(&mut out, &s);
                    assert_eq!(
                        String::from_utf8(out).unwrap(),
                        String::from_utf8(to_vec_go(&s).unwrap()).unwrap(),
                        "{s:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn other_three_byte_characters_pass_through() {
        let v = json!("\u{2029}\u{2713}\u{20ac}<");
        assert_eq!(
            String::from_utf8(to_vec_go(&v).unwrap()).unwrap(),
            "\"\\u2029\u{2713}\u{20ac}\\u003c\""
        );
    }

    /// What Go daprd writes for a JSON body, through the tree: the reference.
    fn by_tree(data: &[u8]) -> Option<Vec<u8>> {
        let v = serde_json::Deserializer::from_slice(data)
            .into_iter::<serde_json::Value>()
            .next()?
            .ok()?;
        Some(to_vec_go(&v).unwrap())
    }

    fn by_pass(data: &[u8]) -> Option<Vec<u8>> {
        let mut out = b"prefix".to_vec();
        let taken = reencode_go(data, &mut out);
        assert!(out.starts_with(b"prefix"), "the prefix is kept");
        if !taken {
            assert_eq!(out, b"prefix", "a refused body leaves nothing behind");
            return None;
        }
        Some(out[6..].to_vec())
    }

    #[test]
    fn the_one_pass_encoding_equals_the_tree_encoding() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let cases: Vec<Vec<u8>> = [
            r#"{"orderId":1,"pad":"xxxx"}"#,
            " \n{ \"b\" : 1 ,\r\n\t\"a\" : [ 1 , 2 , { } , [ ] ] } trailing",
            r#"{"b":1,"a":2,"b":3,"a":{"z":null,"y":true,"y":false}}"#,
            r#"{"\u0062":1,"a":2,"\u00e9":3,"é2":4,"":5}"#,
            r#"["\/\"\\\b\f\n\r\t","\u003c<>&\u2028 \u2029","\ud83d\ude00 😀","\u0000\u001f\u007f"]"#,
            r#"[0,-0,1.50,-1.5,12345678901234567890123,0.000001]"#,
            r#"{"a":"<script>&amp;</script>","k<":"v"}"#,
            "[\"\u{2028}\u{2029}é\u{10FFFF}\"]",
            r#"[true,false,null]"#,
            r#"{"long":"abcdefghijklmnopqrstuvwxyz0123456789","lt":"abcdefghijklmnop<qrstu","zz":"abcdefgh\nijklmnop"}"#,
            "{\"\u{20ac}uro\":\"\u{20ac}\u{20ac}\u{20ac}\u{20ac}\u{20ac}\u{20ac}\u{20ac}\u{20ac}\",\"ctl\":\"abcdefghi\\u0001\"}",
            r#"{}"#,
            r#"[]"#,
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .chain([deep(99).into_bytes(), deep(100).into_bytes()])
        // invalid UTF-8 after the first value, which is all that is read
        .chain([b"{\"a\":\"plain text\"} \xff\xfe".to_vec()])
        .collect();
        for data in &cases {
            let tree = by_tree(data);
            assert!(tree.is_some(), "{}", String::from_utf8_lossy(data));
            assert_eq!(
                by_pass(data),
                tree,
                "one pass vs tree for {}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn what_the_pass_refuses_is_left_to_the_tree() {
        let refused: Vec<Vec<u8>> = [
            &b"1"[..],
            b"\"s\"",
            b"",
            b"{",
            b"[1,]",
            b"{\"a\":01}",
            b"[1.]",
            b"[1e5]",
            b"[1.5E-3]",
            b"[-]",
            b"[\"\\ud800\"]",
            b"[\"\\udc00\"]",
            b"[\"\\x\"]",
            b"[\"a\nb\"]",
            b"[\"\xff\"]",
            b"{\"a\" 1}",
            b"[tru]",
            b"{1:2}",
        ]
        .iter()
        .map(|s| s.to_vec())
        .chain([format!("{}{}", "[".repeat(101), "]".repeat(101)).into_bytes()])
        .collect();
        for data in &refused {
            assert_eq!(by_pass(data), None, "{}", String::from_utf8_lossy(data));
        }
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
