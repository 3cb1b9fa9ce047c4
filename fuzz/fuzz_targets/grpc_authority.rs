//! The gRPC Unix socket's `:authority` patcher: any client bytes, fed in any chunks, give the
//! same output as fed at once, never a panic, and never more released than came in.
#![no_main]

use daprd_runtime::api::grpc_authority::Scanner;
use libfuzzer_sys::fuzz_target;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn run(input: &[u8], chunk: usize) -> Vec<u8> {
    let mut scanner = Scanner::default();
    let (mut pending, mut out) = (Vec::new(), Vec::new());
    for part in input.chunks(chunk.max(1)) {
        pending.extend_from_slice(part);
        let n = scanner.release(&mut pending);
        assert!(n <= pending.len());
        out.extend(pending.drain(..n));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let input = [PREFACE, rest].concat();
    let whole = run(&input, input.len());
    let chunked = run(&input, usize::from(chunk));
    assert_eq!(whole, chunked);
    assert!(whole.len() <= input.len());
});
