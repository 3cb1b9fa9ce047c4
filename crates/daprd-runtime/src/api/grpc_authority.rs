//! The gRPC API on its Unix socket, made reachable by grpc-python (C-core), the transport of
//! the official Python SDK.
//!
//! For a `unix:` target, grpc C-core sends the socket path, percent-encoded, as the request's
//! `:authority` (`tmp%2Fdir%2Fdapr-grpc-app.socket`). The HTTP/2 server library parses the
//! authority as a URI authority, where `%` is not allowed, and resets every such stream with
//! `PROTOCOL_ERROR`; Go daprd's server takes any authority. The runtime never reads the
//! authority, so on the Unix socket every `%` in an `:authority` value is replaced with `_`
//! before the server reads the request headers. The replacement keeps every length as the
//! client encoded it: one byte for one byte in a plain string, and one 6-bit code for another
//! in a Huffman-coded string (`%` and `_` both have 6-bit codes). The frames and the HPACK
//! dynamic table therefore stay exactly as the client sent them, and the server's decoder and
//! the mirror kept here agree on every index.
//!
//! [`AuthorityFix`] wraps a connection; [`Scanner`] is the byte-level part: it walks the
//! client's frames, holds a header block until its last frame is in, decodes it with a mirror
//! of the server's HPACK table (RFC 7541) to find `:authority` values, and patches them in
//! place. Anything it cannot parse is handed to the server unchanged from then on: the server
//! finds the same fault and answers it as HTTP/2 says.

use std::io;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{ready, Context, Poll};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4) precedes the first frame.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// A header block held longer than this is passed on unscanned (the server's own header list
/// limit is far below it).
const MAX_BLOCK: usize = 1 << 20;
/// The server's HPACK table size (SETTINGS_HEADER_TABLE_SIZE): the HTTP/2 default, which the
/// gRPC server keeps.
const TABLE_SIZE: usize = 4096;
/// `:authority` is entry 1 of the static table.
const AUTHORITY_INDEX: usize = 1;

/// The byte-level part of [`AuthorityFix`]: it is fed the client's bytes and says how many of
/// them may go to the server, after patching them in place.
#[derive(Debug)]
pub struct Scanner {
    preface_left: usize,
    /// Payload bytes of the current (non-header) frame still to pass through.
    skip: usize,
    /// Bytes of header-block frames held, counted from the first byte not yet released.
    held: usize,
    /// Where the held block's fragments are, relative to the first held byte.
    fragments: Vec<std::ops::Range<usize>>,
    /// Set at the first fault: everything passes through unscanned from then on.
    passthrough: bool,
    table: Table,
}

impl Default for Scanner {
    fn default() -> Self {
        Self {
            preface_left: PREFACE_LEN,
            skip: 0,
            held: 0,
            fragments: Vec::new(),
            passthrough: false,
            table: Table::default(),
        }
    }
}

impl Scanner {
    /// Takes `data` (the bytes not yet released, the same first byte as on the previous call
    /// plus whatever arrived since) and returns how many leading bytes may go to the server
    /// now; `:authority` values among them have been patched.
    pub fn release(&mut self, data: &mut [u8]) -> usize {
        let mut out = 0;
        loop {
            if self.passthrough {
                return data.len();
            }
            if self.preface_left > 0 || self.skip > 0 {
                let want = if self.preface_left > 0 {
                    &mut self.preface_left
                } else {
                    &mut self.skip
                };
                let n = (*want).min(data.len() - out);
                *want -= n;
                out += n;
                if *want > 0 {
                    return out;
                }
                continue;
            }
            let at = out + self.held;
            let Some(header) = data.get(at..at + FRAME_HEADER_LEN) else {
                return out;
            };
            let len =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let (kind, flags) = (header[3], header[4]);
            let in_block = self.held > 0;
            if !(kind == HEADERS && !in_block || kind == CONTINUATION && in_block) {
                if in_block {
                    // a frame inside a header block: the server answers that fault
                    self.passthrough = true;
                    continue;
                }
                out += FRAME_HEADER_LEN;
                self.skip = len;
                continue;
            }
            if self.held + FRAME_HEADER_LEN + len > MAX_BLOCK {
                self.passthrough = true;
                continue;
            }
            if data.len() < at + FRAME_HEADER_LEN + len {
                return out;
            }
            let (mut start, mut end) = (at + FRAME_HEADER_LEN, at + FRAME_HEADER_LEN + len);
            if kind == HEADERS && flags & PADDED != 0 {
                let pad = if start < end {
                    usize::from(data[start])
                } else {
                    usize::MAX
                };
                start += 1;
                if pad > end.saturating_sub(start) {
                    self.passthrough = true;
                    continue;
                }
                end -= pad;
            }
            if kind == HEADERS && flags & PRIORITY != 0 {
                if end.saturating_sub(start) < 5 {
                    self.passthrough = true;
                    continue;
                }
                start += 5;
            }
            self.fragments.push(start - out..end - out);
            self.held += FRAME_HEADER_LEN + len;
            if flags & END_HEADERS != 0 {
                if self.patch_block(&mut data[out..]).is_err() {
                    self.passthrough = true;
                    continue;
                }
                out += self.held;
                self.held = 0;
                self.fragments.clear();
            }
        }
    }

    /// Decodes the held block (its fragments in `held`) and patches its `:authority` values.
    fn patch_block(&mut self, held: &mut [u8]) -> Result<(), Malformed> {
        let block: Vec<u8> = self
            .fragments
            .iter()
            .flat_map(|r| held[r.clone()].iter().copied())
            .collect();
        let mut patches = Vec::new();
        self.table.decode(&block, &mut patches)?;
        // block offset -> offset in `held`
        let at = |i: usize| {
            let mut i = i;
            for r in &self.fragments {
                if i < r.len() {
                    return r.start + i;
                }
                i -= r.len();
            }
            unreachable!("a patch lies inside the block it was found in")
        };
        for patch in patches {
            match patch {
                Patch::Byte(i) => held[at(i)] = REPLACEMENT,
                Patch::Code(bit) => {
                    let code = canonical().code[usize::from(REPLACEMENT)];
                    for k in 0..6 {
                        let b = bit + k;
                        let mask = 0x80u8 >> (b % 8);
                        let byte = &mut held[at(b / 8)];
                        if code >> (5 - k) & 1 == 1 {
                            *byte |= mask;
                        } else {
                            *byte &= !mask;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// What a `%` in an authority becomes: allowed in an authority, and coded in 6 bits by HPACK's
/// Huffman code like `%`.
const REPLACEMENT: u8 = b'_';

/// A place in a header block to patch: a plain byte, or the bit offset of a 6-bit Huffman code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Patch {
    Byte(usize),
    Code(usize),
}

/// A header block the mirror cannot decode; the server will refuse it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// A mirror of the server's HPACK dynamic table: the size of each entry and whether its name is
/// `:authority` (nothing else of an entry matters here).
#[derive(Debug)]
struct Table {
    /// Newest first: (name length, value length, name is `:authority`).
    entries: std::collections::VecDeque<(usize, usize, bool)>,
    size: usize,
    max: usize,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            entries: std::collections::VecDeque::new(),
            size: 0,
            max: TABLE_SIZE,
        }
    }
}

impl Table {
    /// Decodes `block`, updating the table as the server's decoder will, and records in
    /// `patches` every `%` of an `:authority` value written out in the block.
    fn decode(&mut self, block: &[u8], patches: &mut Vec<Patch>) -> Result<(), Malformed> {
        let mut p = 0;
        while p < block.len() {
            let b = block[p];
            if b & 0x80 != 0 {
                // indexed field
                let index = integer(block, &mut p, 7)?;
                self.name(index)?;
            } else if b & 0xe0 == 0x20 {
                // dynamic table size update
                let max = integer(block, &mut p, 5)?;
                if max > TABLE_SIZE {
                    return Err(Malformed);
                }
                self.max = max;
                self.evict(0);
            } else {
                // literal: with incremental indexing (01), without (0000) or never indexed (0001)
                let indexing = b & 0xc0 == 0x40;
                let index = integer(block, &mut p, if indexing { 6 } else { 4 })?;
                let (name_len, authority) = if index == 0 {
                    let name = string(block, &mut p, None)?;
                    (name.len, name.authority)
                } else {
                    self.name(index)?
                };
                let value = string(block, &mut p, authority.then_some(&mut *patches))?;
                if indexing {
                    self.insert(name_len, value.len, authority);
                }
            }
        }
        Ok(())
    }

    /// The name length of entry `index` and whether it is `:authority`.
    fn name(&self, index: usize) -> Result<(usize, bool), Malformed> {
        match index {
            0 => Err(Malformed),
            i if i <= STATIC_NAMES.len() => Ok((STATIC_NAMES[i - 1].len(), i == AUTHORITY_INDEX)),
            i => self
                .entries
                .get(i - STATIC_NAMES.len() - 1)
                .map(|&(name, _, authority)| (name, authority))
                .ok_or(Malformed),
        }
    }

    fn insert(&mut self, name: usize, value: usize, authority: bool) {
        let size = name + value + 32;
        if size > self.max {
            // an entry larger than the table empties it (RFC 7541 §4.4)
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.entries.push_front((name, value, authority));
        self.size += size;
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some((name, value, _)) = self.entries.pop_back() else {
                break;
            };
            self.size -= name + value + 32;
        }
    }
}

/// An HPACK integer with an `n`-bit prefix at `block[*p]` (RFC 7541 §5.1).
fn integer(block: &[u8], p: &mut usize, n: u32) -> Result<usize, Malformed> {
    let mask = (1usize << n) - 1;
    let mut value = usize::from(*block.get(*p).ok_or(Malformed)?) & mask;
    *p += 1;
    if value < mask {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let b = *block.get(*p).ok_or(Malformed)?;
        *p += 1;
        if shift > 21 {
            return Err(Malformed);
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// A decoded string literal: its length and, for a name, whether it is `:authority`.
struct Str {
    len: usize,
    authority: bool,
}

/// The string literal at `block[*p]` (RFC 7541 §5.2). With `patches`, every `%` in it is
/// recorded there.
fn string(
    block: &[u8],
    p: &mut usize,
    mut patches: Option<&mut Vec<Patch>>,
) -> Result<Str, Malformed> {
    let huffman = block.get(*p).ok_or(Malformed)? & 0x80 != 0;
    let len = integer(block, p, 7)?;
    let start = *p;
    let bytes = block.get(start..start + len).ok_or(Malformed)?;
    *p += len;
    const NAME: &[u8] = b":authority";
    let mut decoded = 0;
    let mut matches_name = true;
    let mut on_symbol = |symbol: u8, at: Patch| {
        matches_name &= NAME.get(decoded) == Some(&symbol);
        decoded += 1;
        if symbol == b'%' {
            if let Some(patches) = patches.as_deref_mut() {
                patches.push(at);
            }
        }
    };
    if huffman {
        huffman_decode(bytes, |symbol, bit| {
            on_symbol(symbol, Patch::Code(start * 8 + bit))
        })?;
    } else {
        for (i, &b) in bytes.iter().enumerate() {
            on_symbol(b, Patch::Byte(start + i));
        }
    }
    Ok(Str {
        len: decoded,
        authority: matches_name && decoded == NAME.len(),
    })
}

/// Decodes HPACK's Huffman code (RFC 7541 §5.2, Appendix B), calling `symbol` with each
/// symbol and the bit offset its code starts at.
fn huffman_decode(bytes: &[u8], mut symbol: impl FnMut(u8, usize)) -> Result<(), Malformed> {
    let table = canonical();
    let (mut code, mut len, mut start) = (0u32, 0usize, 0usize);
    for bit in 0..bytes.len() * 8 {
        code = code << 1 | u32::from(bytes[bit / 8] >> (7 - bit % 8) & 1);
        len += 1;
        if len > 30 {
            return Err(Malformed);
        }
        let offset = code.wrapping_sub(table.first[len]);
        if offset < u32::from(table.count[len]) {
            let s = table.symbols[usize::from(table.index[len]) + offset as usize];
            // EOS inside a string is an error (§5.2)
            let s = u8::try_from(s).map_err(|_| Malformed)?;
            symbol(s, start);
            (code, len, start) = (0, 0, bit + 1);
        }
    }
    // padding: at most 7 bits, all ones (the start of EOS)
    if len > 7 || code != (1 << len) - 1 {
        return Err(Malformed);
    }
    Ok(())
}

/// HPACK's Huffman code is canonical: it follows from each symbol's code length. The symbols
/// (256 is EOS) by code length, in symbol order (RFC 7541 Appendix B).
#[rustfmt::skip]
const CODE_LENGTHS: [(usize, &[u16]); 21] = [
    (5, &[48, 49, 50, 97, 99, 101, 105, 111, 115, 116]),
    (6, &[32, 37, 45, 46, 47, 51, 52, 53, 54, 55, 56, 57, 61, 65, 95, 98, 100, 102, 103, 104, 108, 109, 110, 112, 114, 117]),
    (7, &[58, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 89, 106, 107, 113, 118, 119, 120, 121, 122]),
    (8, &[38, 42, 44, 59, 88, 90]),
    (10, &[33, 34, 40, 41, 63]),
    (11, &[39, 43, 124]),
    (12, &[35, 62]),
    (13, &[0, 36, 64, 91, 93, 126]),
    (14, &[94, 125]),
    (15, &[60, 96, 123]),
    (19, &[92, 195, 208]),
    (20, &[128, 130, 131, 162, 184, 194, 224, 226]),
    (21, &[153, 161, 167, 172, 176, 177, 179, 209, 216, 217, 227, 229, 230]),
    (22, &[129, 132, 133, 134, 136, 146, 154, 156, 160, 163, 164, 169, 170, 173, 178, 181, 185, 186, 187, 189, 190, 196, 198, 228, 232, 233]),
    (23, &[1, 135, 137, 138, 139, 140, 141, 143, 147, 149, 150, 151, 152, 155, 157, 158, 165, 166, 168, 174, 175, 180, 182, 183, 188, 191, 197, 231, 239]),
    (24, &[9, 142, 144, 145, 148, 159, 171, 206, 215, 225, 236, 237]),
    (25, &[199, 207, 234, 235]),
    (26, &[192, 193, 200, 201, 202, 205, 210, 213, 218, 219, 238, 240, 242, 243, 255]),
    (27, &[203, 204, 211, 212, 214, 221, 222, 223, 241, 244, 245, 246, 247, 248, 250, 251, 252, 253, 254]),
    (28, &[2, 3, 4, 5, 6, 7, 8, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 23, 24, 25, 26, 27, 28, 29, 30, 31, 127, 220, 249]),
    (30, &[10, 13, 22, 256]),
];

/// The canonical decoding tables built from [`CODE_LENGTHS`].
struct Canonical {
    /// The first code of each length.
    first: [u32; 31],
    /// How many codes each length has.
    count: [u16; 31],
    /// Where each length's symbols start in `symbols`.
    index: [u16; 31],
    symbols: Vec<u16>,
    /// Each symbol's code (for the replacement).
    code: [u32; 257],
}

fn canonical() -> &'static Canonical {
    static TABLE: LazyLock<Canonical> = LazyLock::new(|| {
        let mut t = Canonical {
            first: [0; 31],
            count: [0; 31],
            index: [0; 31],
            symbols: Vec::with_capacity(257),
            code: [0; 257],
        };
        let mut code = 0u32;
        let mut prev = 0;
        for &(len, symbols) in &CODE_LENGTHS {
            code <<= len - prev;
            prev = len;
            t.first[len] = code;
            t.count[len] = symbols.len() as u16;
            t.index[len] = t.symbols.len() as u16;
            for &s in symbols {
                t.symbols.push(s);
                t.code[usize::from(s)] = code;
                code += 1;
            }
        }
        t
    });
    &TABLE
}

/// The names of HPACK's static table (RFC 7541 Appendix A), entries 1 to 61.
#[rustfmt::skip]
const STATIC_NAMES: [&str; 61] = [
    ":authority", ":method", ":method", ":path", ":path", ":scheme", ":scheme", ":status",
    ":status", ":status", ":status", ":status", ":status", ":status", "accept-charset",
    "accept-encoding", "accept-language", "accept-ranges", "accept", "access-control-allow-origin",
    "age", "allow", "authorization", "cache-control", "content-disposition", "content-encoding",
    "content-language", "content-length", "content-location", "content-range", "content-type",
    "cookie", "date", "etag", "expect", "expires", "from", "host", "if-match",
    "if-modified-since", "if-none-match", "if-range", "if-unmodified-since", "last-modified",
    "link", "location", "max-forwards", "proxy-authenticate", "proxy-authorization", "range",
    "referer", "refresh", "retry-after", "server", "set-cookie", "strict-transport-security",
    "transfer-encoding", "user-agent", "vary", "via", "www-authenticate",
];

/// A server-side connection whose inbound `:authority` values are patched as the module says.
#[derive(Debug)]
pub struct AuthorityFix<IO> {
    io: IO,
    /// Inbound bytes: the first `released` are ready for the server, the rest still scanned.
    buf: BytesMut,
    released: usize,
    scanner: Scanner,
}

impl<IO> AuthorityFix<IO> {
    /// Wraps the server side of a freshly accepted connection.
    pub fn new(io: IO) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            released: 0,
            scanner: Scanner::default(),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for AuthorityFix<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.released > 0 {
                let n = this.released.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                this.released -= n;
                return Poll::Ready(Ok(()));
            }
            this.buf.reserve(16 * 1024);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.io),
                cx,
                &mut this.buf
            ))?;
            if n == 0 {
                if this.buf.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                // the peer closed mid-frame: the server gets what came and sees the end
                this.released = this.buf.len();
                continue;
            }
            this.released = this.scanner.release(&mut this.buf);
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<IO>
{
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HPACK's Huffman code for `s` (the encoder is only needed by the tests).
    fn huffman(s: &[u8]) -> Vec<u8> {
        let t = canonical();
        let len_of = |sym: usize| {
            CODE_LENGTHS
                .iter()
                .find(|(_, s)| s.contains(&(sym as u16)))
                .unwrap()
                .0
        };
        let (mut out, mut acc, mut bits) = (Vec::new(), 0u64, 0);
        for &c in s {
            let len = len_of(usize::from(c));
            acc = acc << len | u64::from(t.code[usize::from(c)]);
            bits += len;
            while bits >= 8 {
                out.push((acc >> (bits - 8)) as u8);
                bits -= 8;
            }
        }
        if bits > 0 {
            out.push((acc << (8 - bits)) as u8 | (0xff >> bits));
        }
        out
    }

    fn decoded(bytes: &[u8]) -> Vec<u8> {
        let mut s = Vec::new();
        huffman_decode(bytes, |c, _| s.push(c)).unwrap();
        s
    }

    fn string_literal(s: &[u8], huff: bool) -> Vec<u8> {
        let body = if huff { huffman(s) } else { s.to_vec() };
        assert!(body.len() < 127);
        let mut out = vec![body.len() as u8 | if huff { 0x80 } else { 0 }];
        out.extend(body);
        out
    }

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        out.extend_from_slice(payload);
        out
    }

    /// The whole stream through the scanner, fed `chunk` bytes at a time as a reader would.
    fn through(stream: &[u8], chunk: usize) -> Vec<u8> {
        let mut scanner = Scanner::default();
        let mut pending = Vec::new();
        let mut out = Vec::new();
        for part in stream.chunks(chunk) {
            pending.extend_from_slice(part);
            let n = scanner.release(&mut pending);
            out.extend(pending.drain(..n));
        }
        assert!(pending.is_empty(), "everything is released once complete");
        out
    }

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    #[test]
    fn the_huffman_table_is_rfc_7541s() {
        // RFC 7541 C.4.1 and C.4.2
        let www = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        assert_eq!(decoded(&www), b"www.example.com");
        assert_eq!(decoded(&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf]), b"no-cache");
        assert_eq!(huffman(b"www.example.com"), www);
        // every symbol round-trips; `%` and `_` have codes of the same length
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decoded(&huffman(&all)), all);
        let len_of = |c: u8| {
            CODE_LENGTHS
                .iter()
                .find(|(_, s)| s.contains(&u16::from(c)))
                .unwrap()
                .0
        };
        assert_eq!(len_of(b'%'), 6);
        assert_eq!(len_of(REPLACEMENT), 6);
        // padding longer than 7 bits, or not ones, is refused
        assert_eq!(decoded(&[0x1f]), b"a"); // 00011 and three bits of padding
        assert_eq!(huffman_decode(&[0xff], |_, _| {}), Err(Malformed));
        assert_eq!(huffman_decode(&[0x00], |_, _| {}), Err(Malformed));
    }

    #[test]
    fn rfc_7541_requests_decode_and_keep_the_table_in_step() {
        // C.3: three requests without Huffman coding, sharing the dynamic table
        let mut t = Table::default();
        let mut patches = Vec::new();
        let first = hex("828684410f7777772e6578616d706c652e636f6d");
        t.decode(&first, &mut patches).unwrap();
        assert_eq!(t.size, 57);
        let second = hex("828684be58086e6f2d6361636865");
        t.decode(&second, &mut patches).unwrap();
        assert_eq!(t.size, 110);
        let third = hex("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565");
        t.decode(&third, &mut patches).unwrap();
        assert_eq!(t.size, 164);
        assert!(patches.is_empty(), "no % anywhere");
        // an index past the table is malformed
        assert_eq!(t.decode(&[0x80 | 70], &mut patches), Err(Malformed));
        assert_eq!(t.decode(&[0x80], &mut patches), Err(Malformed));
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A gRPC request's header block as grpc C-core writes one: `:authority` a literal with
    /// incremental indexing on the static name, the rest indexed or literal.
    fn request_block(authority: &[u8], huff: bool) -> Vec<u8> {
        let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
        b.push(0x44); // :path, literal with indexing
        b.extend(string_literal(
            b"/dapr.proto.runtime.v1.Dapr/GetMetadata",
            huff,
        ));
        b.push(0x41); // :authority, literal with indexing
        b.extend(string_literal(authority, huff));
        b.push(0x40); // te: trailers, new name
        b.extend(string_literal(b"te", huff));
        b.extend(string_literal(b"trailers", huff));
        b
    }

    fn authority_in(block: &[u8]) -> Vec<u8> {
        // the fourth representation is the authority literal: skip 2 indexed + the :path one
        let mut p = 2;
        p += 1;
        string(block, &mut p, None).unwrap();
        p += 1;
        let huff = block[p] & 0x80 != 0;
        let len = integer(block, &mut p, 7).unwrap();
        let bytes = &block[p..p + len];
        if huff {
            decoded(bytes)
        } else {
            bytes.to_vec()
        }
    }

    #[test]
    fn a_percent_encoded_authority_becomes_acceptable_in_both_codings() {
        let authority = b"tmp%2Fpytest%2Fdapr-grpc-app.socket";
        for huff in [false, true] {
            let block = request_block(authority, huff);
            let mut stream = PREFACE.to_vec();
            stream.extend(frame(0x4, 0, &[0, 0, 0, 0, 0, 0])); // SETTINGS
            stream.extend(frame(HEADERS, END_HEADERS, &block));
            stream.extend(frame(0x0, 0x1, b"\0\0\0\0\x05hello")); // DATA, END_STREAM
            for chunk in [1, 7, 4096] {
                let out = through(&stream, chunk);
                assert_eq!(
                    out.len(),
                    stream.len(),
                    "lengths unchanged (huffman {huff})"
                );
                let at = PREFACE.len() + 15 + FRAME_HEADER_LEN;
                let patched = &out[at..at + block.len()];
                assert_eq!(
                    authority_in(patched),
                    b"tmp_2Fpytest_2Fdapr-grpc-app.socket",
                    "huffman {huff}"
                );
                assert_eq!(out[..at], stream[..at]);
                assert_eq!(out[at + block.len()..], stream[at + block.len()..]);
            }
        }
    }

    #[test]
    fn a_block_split_over_continuation_frames_and_padding_is_patched() {
        let block = request_block(b"a%2Fb%2Fc.socket", true);
        let (one, two) = block.split_at(block.len() - 18); // inside the authority's value
        let mut padded = vec![3u8]; // pad length
        padded.extend_from_slice(&[0, 0, 0, 0, 16]); // priority: dependency and weight
        padded.extend_from_slice(one);
        padded.extend_from_slice(&[0, 0, 0]);
        let mut stream = PREFACE.to_vec();
        stream.extend(frame(HEADERS, PADDED | PRIORITY, &padded));
        stream.extend(frame(CONTINUATION, END_HEADERS, two));
        for chunk in [1, 3, 1000] {
            let out = through(&stream, chunk);
            assert_eq!(out.len(), stream.len());
            let mut rebuilt = out[PREFACE.len() + FRAME_HEADER_LEN + 6..][..one.len()].to_vec();
            rebuilt.extend_from_slice(&out[out.len() - two.len()..]);
            assert_eq!(authority_in(&rebuilt), b"a_2Fb_2Fc.socket");
        }
    }

    #[test]
    fn an_authority_indexed_in_the_dynamic_table_is_found_by_name_and_left_as_the_server_holds_it()
    {
        // request 1 inserts `:authority` with a literal name; request 2 writes a new authority
        // on the dynamic entry's name (index 62 + position)
        let mut t = Table::default();
        let mut first = vec![0x40];
        first.extend(string_literal(b":authority", true));
        first.extend(string_literal(b"x%41", false));
        let mut patches = Vec::new();
        t.decode(&first, &mut patches).unwrap();
        let [Patch::Byte(i)] = patches[..] else {
            panic!("one plain % in {patches:?}")
        };
        assert_eq!(first[i], b'%');
        let mut second = vec![0xbe]; // indexed 62: the entry itself
        second.push(0x0f); // literal without indexing, name index 62 (4-bit prefix: 15 + 47)
        second.push(47);
        second.extend(string_literal(b"%y", true));
        patches.clear();
        t.decode(&second, &mut patches).unwrap();
        assert_eq!(patches, vec![Patch::Code(4 * 8)]);
    }

    #[test]
    fn malformed_or_odd_input_passes_through_unchanged_and_never_panics() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let mut stream = PREFACE.to_vec();
            let n = rng.usize(0..200);
            stream.extend((0..n).map(|_| rng.u8(..)));
            // some frames that look like headers
            if rng.bool() {
                let body: Vec<u8> = (0..rng.usize(0..40)).map(|_| rng.u8(..)).collect();
                stream.extend(frame(HEADERS, rng.u8(..), &body));
            }
            let mut scanner = Scanner::default();
            let mut copy = stream.clone();
            let n = scanner.release(&mut copy);
            assert!(n <= copy.len());
        }
        // a frame inside a header block: everything passes from then on
        let mut stream = PREFACE.to_vec();
        stream.extend(frame(HEADERS, 0, &[0x82]));
        stream.extend(frame(0x0, 0, b"data"));
        let out = through(&stream, 5);
        assert_eq!(out, stream);
        // an undecodable block goes on as it came
        let mut stream = PREFACE.to_vec();
        stream.extend(frame(HEADERS, END_HEADERS, &[0x41, 0x85, b'%']));
        assert_eq!(through(&stream, 100), stream);
    }
}
