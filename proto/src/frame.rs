//! Length-prefixed frames, with no I/O.
//!
//! A frame is a 4-byte big-endian payload length followed by the payload.
//! The length is checked against the reader's limit before a single byte of
//! the payload is buffered, so a peer cannot make us allocate by announcing
//! a huge frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes in a frame header.
pub const FRAME_HEADER_BYTES: usize = 4;
/// Default limit on a frame's payload: room for a large job spec or log chunk.
pub const FRAME_BYTES_MAX_DEFAULT: u32 = 4 * 1024 * 1024;
/// Highest limit a reader may be configured with.
pub const FRAME_BYTES_MAX_CAP: u32 = 16 * 1024 * 1024;

/// Framing failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame larger than we accept.
    #[error("frame of {len_bytes} bytes exceeds the limit of {frame_bytes_max} bytes")]
    Oversized {
        /// Announced payload length.
        len_bytes: u64,
        /// The limit in force.
        frame_bytes_max: u32,
    },
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({have_bytes} of {need_bytes} bytes received)")]
    Truncated {
        /// Bytes the frame needed, header included.
        need_bytes: usize,
        /// Bytes that arrived.
        have_bytes: usize,
    },
    /// The transport failed.
    #[error("transport error: {0}")]
    Io(#[from] std::io::Error),
}

impl crate::retry::Classify for FrameError {
    /// A broken connection may work again after a reconnect; a peer that sends
    /// oversized frames will do so again.
    fn retry(&self) -> crate::retry::Retry {
        crate::retry::Retry::when(!matches!(self, FrameError::Oversized { .. }))
    }
}

/// Splits a byte stream into frames.
#[derive(Clone, Debug)]
pub struct FrameDecoder {
    frame_bytes_max: u32,
}

impl FrameDecoder {
    /// A decoder that refuses payloads over `frame_bytes_max` (capped at [`FRAME_BYTES_MAX_CAP`]).
    pub fn new(frame_bytes_max: u32) -> FrameDecoder {
        FrameDecoder { frame_bytes_max: frame_bytes_max.min(FRAME_BYTES_MAX_CAP) }
    }

    /// The limit in force.
    pub fn frame_bytes_max(&self) -> u32 {
        self.frame_bytes_max
    }

    /// Takes one whole frame's payload off the front of `buf`, if one is there.
    ///
    /// Returns `Ok(None)` when more bytes are needed, having reserved room for
    /// at most the announced (and already checked) frame.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        if buf.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if len > self.frame_bytes_max {
            return Err(FrameError::Oversized { len_bytes: len.into(), frame_bytes_max: self.frame_bytes_max });
        }
        let total = FRAME_HEADER_BYTES + len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(FRAME_HEADER_BYTES);
        Ok(Some(buf.split_to(len as usize).freeze()))
    }

    /// Called at end of stream: any partial frame left over is an error.
    pub fn decode_eof(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => {
                let need_bytes = if buf.len() < FRAME_HEADER_BYTES {
                    FRAME_HEADER_BYTES
                } else {
                    FRAME_HEADER_BYTES + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
                };
                Err(FrameError::Truncated { need_bytes, have_bytes: buf.len() })
            }
        }
    }
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT)
    }
}

/// Appends a frame holding `payload` to `out`.
///
/// Fails with [`FrameError::Oversized`] if the payload is over `frame_bytes_max`,
/// so a sender never emits what its peer would refuse.
pub fn encode_frame(payload: &[u8], frame_bytes_max: u32, out: &mut BytesMut) -> Result<(), FrameError> {
    if payload.len() as u64 > u64::from(frame_bytes_max.min(FRAME_BYTES_MAX_CAP)) {
        return Err(FrameError::Oversized { len_bytes: payload.len() as u64, frame_bytes_max });
    }
    out.reserve(FRAME_HEADER_BYTES + payload.len());
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
    Ok(())
}
