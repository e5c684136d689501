//! Message encoding. Everything that knows the encoding is bincode lives here,
//! so it can be swapped without touching the rest of the protocol.

use crate::frame::FRAME_BYTES_MAX_CAP;
use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The bincode configuration. The limit makes bincode check every length it
/// reads against the largest frame before it allocates: a hostile length
/// prefix inside a small frame then fails instead of asking for gigabytes.
type Config = Configuration<LittleEndian, Varint, Limit<{ FRAME_BYTES_MAX_CAP as usize }>>;

const CONFIG: Config = bincode::config::standard().with_limit::<{ FRAME_BYTES_MAX_CAP as usize }>();

/// A message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value could not be encoded (should not happen for protocol types).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The bytes are not a valid message of the expected type.
    #[error("malformed message: {0}")]
    Garbage(String),
    /// A valid message was followed by unexpected bytes.
    #[error("malformed message: {extra} unexpected bytes after the message")]
    TrailingBytes {
        /// How many bytes were left over.
        extra: usize,
    },
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(value, out, CONFIG).map(|_| ()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Encodes `value` into a new buffer.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Decodes exactly one `T` from `bytes`; leftover bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) =
        bincode::serde::decode_from_slice(bytes, CONFIG).map_err(|e| CodecError::Garbage(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes { extra: bytes.len() - used });
    }
    Ok(value)
}
