//! The few RESP2 frames a subscribed connection receives, parsed out of a read buffer.
//!
//! The pub/sub connection is ours (not the `redis` crate's) so that nothing queues between
//! the socket and the handler: we read only as fast as the handler takes deliveries, and Redis's
//! `client-output-buffer-limit pubsub` is the bound (see the engine's module doc).

use std::ops::Range;

use bytes::{Bytes, BytesMut};

/// Largest bulk string accepted (Redis's own default `proto-max-bulk-len` is 512 MiB; a
/// publication is far smaller, and anything this big is treated as a broken stream).
const MAX_BULK: usize = 64 << 20;
/// Largest array accepted: pub/sub frames have three or four elements.
const MAX_ARRAY: usize = 1024;
/// Nesting accepted: pub/sub frames are flat arrays.
const MAX_DEPTH: usize = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    Simple(Bytes),
    Error(Bytes),
    Int(i64),
    Bulk(Option<Bytes>),
    Array(Vec<Frame>),
}

impl Frame {
    pub(crate) fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Frame::Simple(b) | Frame::Bulk(Some(b)) => Some(b),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed RESP frame: {0}")]
pub(crate) struct ProtocolError(&'static str);

enum Raw {
    Simple(Range<usize>),
    Error(Range<usize>),
    Int(i64),
    Bulk(Option<Range<usize>>),
    Array(Vec<Raw>),
}

/// Takes the first complete frame out of `buf`, or returns `None` when more bytes are needed.
pub(crate) fn take_frame(buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
    let Some((raw, len)) = parse(buf, 0, 0)? else {
        return Ok(None);
    };
    let bytes = buf.split_to(len).freeze();
    Ok(Some(materialize(raw, &bytes)))
}

fn materialize(raw: Raw, bytes: &Bytes) -> Frame {
    match raw {
        Raw::Simple(r) => Frame::Simple(bytes.slice(r)),
        Raw::Error(r) => Frame::Error(bytes.slice(r)),
        Raw::Int(n) => Frame::Int(n),
        Raw::Bulk(r) => Frame::Bulk(r.map(|r| bytes.slice(r))),
        Raw::Array(items) => {
            Frame::Array(items.into_iter().map(|r| materialize(r, bytes)).collect())
        }
    }
}

/// The line starting at `at` (without its CRLF) and the index after the CRLF.
fn line(buf: &[u8], at: usize) -> Result<Option<(Range<usize>, usize)>, ProtocolError> {
    let Some(rel) = buf[at..].iter().position(|&b| b == b'\r') else {
        if buf.len() - at > 64 * 1024 {
            return Err(ProtocolError("line too long"));
        }
        return Ok(None);
    };
    let cr = at + rel;
    match buf.get(cr + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((at..cr, cr + 2))),
        Some(_) => Err(ProtocolError("CR without LF")),
    }
}

fn int(digits: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ProtocolError("bad integer"))
}

fn parse(buf: &[u8], at: usize, depth: usize) -> Result<Option<(Raw, usize)>, ProtocolError> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some((head, next)) = line(buf, at + 1)? else {
        return Ok(None);
    };
    match kind {
        b'+' => Ok(Some((Raw::Simple(head), next))),
        b'-' => Ok(Some((Raw::Error(head), next))),
        b':' => Ok(Some((Raw::Int(int(&buf[head])?), next))),
        b'$' => {
            let n = int(&buf[head])?;
            if n == -1 {
                return Ok(Some((Raw::Bulk(None), next)));
            }
            let n = usize::try_from(n).map_err(|_| ProtocolError("negative length"))?;
            if n > MAX_BULK {
                return Err(ProtocolError("bulk string too long"));
            }
            let end = next + n;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError("bulk string without CRLF"));
            }
            Ok(Some((Raw::Bulk(Some(next..end)), end + 2)))
        }
        b'*' => {
            let n = int(&buf[head])?;
            if n == -1 {
                return Ok(Some((Raw::Bulk(None), next)));
            }
            let n = usize::try_from(n).map_err(|_| ProtocolError("negative length"))?;
            if n > MAX_ARRAY {
                return Err(ProtocolError("array too long"));
            }
            if depth >= MAX_DEPTH {
                return Err(ProtocolError("arrays nested too deep"));
            }
            let mut items = Vec::with_capacity(n);
            let mut at = next;
            for _ in 0..n {
                let Some((item, after)) = parse(buf, at, depth + 1)? else {
                    return Ok(None);
                };
                items.push(item);
                at = after;
            }
            Ok(Some((Raw::Array(items), at)))
        }
        _ => Err(ProtocolError("unknown frame type")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Frame {
        Frame::Bulk(Some(Bytes::copy_from_slice(s.as_bytes())))
    }

    #[test]
    fn parses_messages_split_at_every_byte() {
        let wire = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhe\r\no\r\n+PONG\r\n:7\r\n";
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut frames = Vec::new();
            while let Some(f) = take_frame(&mut buf).unwrap() {
                frames.push(f);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = take_frame(&mut buf).unwrap() {
                frames.push(f);
            }
            assert_eq!(
                frames,
                vec![
                    Frame::Array(vec![bulk("message"), bulk("ch"), bulk("he\r\no")]),
                    Frame::Simple(Bytes::from_static(b"PONG")),
                    Frame::Int(7),
                ],
                "cut at {cut}"
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn rejects_garbage() {
        for wire in [
            &b"?x\r\n"[..],
            b"$3\r\nabcd\r\n",
            b":x\r\n",
            b"*1\r\n*1\r\n*1\r\n:1\r\n",
            b"$99999999999\r\n",
            b"+a\rb\r\n",
        ] {
            let mut buf = BytesMut::from(wire);
            assert!(take_frame(&mut buf).is_err(), "{wire:?}");
        }
    }

    #[test]
    fn null_bulk_and_errors() {
        let mut buf = BytesMut::from(&b"$-1\r\n-ERR no\r\n"[..]);
        assert_eq!(take_frame(&mut buf).unwrap(), Some(Frame::Bulk(None)));
        assert_eq!(
            take_frame(&mut buf).unwrap(),
            Some(Frame::Error(Bytes::from_static(b"ERR no")))
        );
        assert_eq!(take_frame(&mut buf).unwrap(), None);
    }
}
