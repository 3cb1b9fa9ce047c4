//! The broker's side of the wire written as Azure writes it: every performative with all its
//! fields. AMQP 1.0 lets a sender leave trailing null fields out of a performative's list, and
//! `fe2o3-amqp` does; Azure's services write them all, and the AMQP stack of Microsoft's
//! Python Event Hubs client (`azure-eventhub` 5.15) reads fields by position without checking
//! the count (an `open` with fewer than ten fields fails it). So the frames the engine writes
//! are copied to the client with their lists padded with nulls to the performative's full
//! length; nothing else changes (a transfer's payload follows its padded list).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The number of fields of a performative (or SASL frame) by its descriptor code.
fn full_length(code: u8) -> Option<usize> {
    Some(match code {
        0x10 => 10,       // open
        0x11 => 8,        // begin
        0x12 => 14,       // attach
        0x13 => 11,       // flow
        0x14 => 11,       // transfer
        0x15 => 6,        // disposition
        0x16 => 3,        // detach
        0x17 | 0x18 => 1, // end, close
        0x40 => 1,        // sasl-mechanisms
        0x44 => 2,        // sasl-outcome
        _ => return None,
    })
}

/// The frame body `body` (after the frame header and its extension) with the performative's
/// list padded to its full length; as it is when it is not one, or is full already.
fn pad(body: &[u8]) -> Option<Vec<u8>> {
    // a described type with a small-ulong descriptor, then the list
    if body.len() < 4 || body[0] != 0x00 || body[1] != 0x53 {
        return None;
    }
    let full = full_length(body[2])?;
    let (count, items, rest) = match body[3] {
        0x45 => (0, &body[4..4], &body[4..]),
        0xc0 => {
            let size = usize::from(*body.get(4)?);
            let end = 5 + size;
            (
                usize::from(*body.get(5)?),
                body.get(6..end)?,
                body.get(end..)?,
            )
        }
        0xd0 => {
            let size = u32::from_be_bytes(body.get(4..8)?.try_into().ok()?) as usize;
            let count = u32::from_be_bytes(body.get(8..12)?.try_into().ok()?) as usize;
            let end = 8 + size;
            (count, body.get(12..end)?, body.get(end..)?)
        }
        _ => return None,
    };
    if count >= full {
        return None;
    }
    let mut fields = items.to_vec();
    fields.resize(items.len() + (full - count), 0x40); // null
    let mut out = Vec::with_capacity(body.len() + full + 8);
    out.extend_from_slice(&body[..3]);
    match u8::try_from(fields.len() + 1) {
        Ok(size) => {
            out.extend_from_slice(&[0xc0, size, u8::try_from(full).ok()?]);
        }
        Err(_) => {
            out.push(0xd0);
            out.extend_from_slice(&u32::try_from(fields.len() + 4).ok()?.to_be_bytes());
            out.extend_from_slice(&u32::try_from(full).ok()?.to_be_bytes());
        }
    }
    out.extend_from_slice(&fields);
    out.extend_from_slice(rest);
    Some(out)
}

/// Copies the engine's output to the client frame by frame, padding performatives (protocol
/// headers and frames that are not performatives pass unchanged), until either side ends.
pub(super) async fn copy_padded<R, W>(mut from: R, mut to: W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut head = [0u8; 8];
        from.read_exact(&mut head).await?;
        if &head[..4] == b"AMQP" {
            to.write_all(&head).await?;
            to.flush().await?;
            continue;
        }
        let size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let mut rest = vec![0u8; size.saturating_sub(8)];
        from.read_exact(&mut rest).await?;
        let ext = (usize::from(head[4]) * 4).saturating_sub(8).min(rest.len());
        match pad(&rest[ext..]) {
            Some(body) => {
                let size = u32::try_from(8 + ext + body.len()).unwrap_or(u32::MAX);
                head[..4].copy_from_slice(&size.to_be_bytes());
                to.write_all(&head).await?;
                to.write_all(&rest[..ext]).await?;
                to.write_all(&body).await?;
            }
            None => {
                to.write_all(&head).await?;
                to.write_all(&rest).await?;
            }
        }
        to.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_open_is_padded_to_ten_fields() {
        // open with container-id "a" only (list8: size 4, count 1, str8 "a")
        let body = [0x00, 0x53, 0x10, 0xc0, 0x04, 0x01, 0xa1, 0x01, b'a'];
        let padded = pad(&body).expect("padded");
        assert_eq!(
            padded,
            [
                0x00, 0x53, 0x10, 0xc0, 0x0d, 0x0a, 0xa1, 0x01, b'a', 0x40, 0x40, 0x40, 0x40, 0x40,
                0x40, 0x40, 0x40, 0x40
            ]
        );
        assert_eq!(pad(&padded), None, "full already");
    }

    #[test]
    fn a_transfers_payload_follows_its_padded_list() {
        // transfer with handle 0 (list0 is not possible with a field; smalluint 0: 0x52 0x00)
        let mut body = vec![0x00, 0x53, 0x14, 0xc0, 0x03, 0x01, 0x52, 0x00];
        body.extend_from_slice(b"payload");
        let padded = pad(&body).expect("padded");
        assert_eq!(&padded[3..6], &[0xc0, 0x0d, 0x0b]);
        assert!(padded.ends_with(b"payload"));
        assert_eq!(padded.len(), body.len() + 10);
    }

    #[test]
    fn other_frames_pass_unchanged() {
        assert_eq!(pad(&[]), None, "an empty frame (heartbeat)");
        assert_eq!(pad(&[0x00, 0x53, 0x77, 0x45]), None, "not a performative");
    }
}
