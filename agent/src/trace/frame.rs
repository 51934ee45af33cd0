//! The stream between the agent and `sidecap trace`: frames of a 4-byte big-endian length
//! and that many bytes of JSON, both ways (records and reports from the agent, heartbeats
//! from the CLI). Buffers are `bytes`: the reader accumulates whatever the socket gives
//! and splits whole frames off without copying the rest.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Largest frame either side accepts (a record is a few hundred bytes).
pub const MAX_FRAME: usize = 64 * 1024;

/// One message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Frame {
    /// The agent turned the pod's trace on; records follow.
    Started { pod: String, lease_secs: u64, rate: u32 },
    /// One kernel record (see `record::Record::to_json`).
    Record(serde_json::Value),
    /// Records left out so far by the rate limit (a running total).
    Dropped { count: u64 },
    /// CLI → agent: renews the lease.
    Heartbeat,
    /// The session is over (the pod's trace is off again).
    End { reason: String, records: u64, dropped: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("trace frame of {len} bytes is larger than {MAX_FRAME}")]
    TooLarge { len: usize },
    #[error("trace frame is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Appends `frame` to `out`, length first.
pub fn encode(frame: &Frame, out: &mut BytesMut) -> Result<(), FrameError> {
    let body = serde_json::to_vec(frame)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { len: body.len() });
    }
    out.reserve(4 + body.len());
    out.put_u32(body.len() as u32);
    out.put_slice(&body);
    Ok(())
}

/// Splits frames off a byte stream fed in arbitrary pieces.
#[derive(Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, None until one has fully arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some(body) = self.next_body()? else { return Ok(None) };
        Ok(Some(serde_json::from_slice(&body)?))
    }

    fn next_body(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge { len });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        self.buf.advance(4);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Bytes received that are not a whole frame yet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_split_of_the_stream() {
        let frames = vec![
            Frame::Started { pod: "default/a".into(), lease_secs: 5, rate: 200 },
            Frame::Record(serde_json::json!({"hook": "connect4", "step": 6})),
            Frame::Heartbeat,
            Frame::Dropped { count: 3 },
            Frame::End { reason: "the CLI closed the stream".into(), records: 1, dropped: 3 },
        ];
        let mut wire = BytesMut::new();
        for f in &frames {
            encode(f, &mut wire).expect("encode");
        }
        for chunk in [1, 3, 7, wire.len()] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                d.feed(piece);
                while let Some(f) = d.next_frame().expect("decode") {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "chunks of {chunk}");
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn an_oversized_or_garbled_frame_is_an_error_not_a_panic() {
        let mut d = Decoder::default();
        d.feed(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
        let mut d = Decoder::default();
        d.feed(&[0, 0, 0, 3, b'{', b'x', b'}']);
        assert!(matches!(d.next_frame(), Err(FrameError::Json(_))));
    }
}
