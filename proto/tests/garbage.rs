//! Hostile input: the decoders return errors, never panic, never over-allocate.

mod common;

use bytes::BytesMut;
use cosmos_proto::handshake::{self, HandshakeError, Hello};
use cosmos_proto::{AgentMsg, CodecError, ControllerMsg, FrameDecoder, codec};
use proptest::prelude::*;

fn feed_everything(bytes: &[u8]) {
    let decoder = FrameDecoder::new(1024 * 1024);
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(frame)) = decoder.decode(&mut buf) {
        let _ = codec::decode::<AgentMsg>(&frame);
        let _ = codec::decode::<ControllerMsg>(&frame);
        let _ = handshake::decode_payload::<Hello>(&frame);
    }
    let _ = decoder.decode_eof(&mut buf);
    let _ = codec::decode::<AgentMsg>(bytes);
    let _ = codec::decode::<ControllerMsg>(bytes);
    let _ = handshake::decode_payload::<Hello>(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        feed_everything(&bytes);
    }

    /// Random bytes rarely get past the first enum tag; flipping bytes of
    /// valid messages reaches the deeper decoding paths.
    #[test]
    fn mutated_messages_never_panic(
        msg in common::controller_msg(),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut bytes = codec::encode(&msg).unwrap();
        for (at, value) in flips {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        feed_everything(&bytes);
    }
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = codec::encode(&ControllerMsg::Drain { draining: true }).unwrap();
    bytes.push(0);
    assert!(matches!(codec::decode::<ControllerMsg>(&bytes), Err(CodecError::TrailingBytes { extra: 1 })));
    // The count is of the bytes past the message, however many.
    let mut bytes =
        codec::encode(&ControllerMsg::Cancel { attempt_id: cosmos_proto::AttemptId(7), grace_ms: 1_000 }).unwrap();
    bytes.extend_from_slice(&[0; 3]);
    assert!(matches!(codec::decode::<ControllerMsg>(&bytes), Err(CodecError::TrailingBytes { extra: 3 })));
}

#[test]
fn a_string_claiming_gigabytes_inside_a_small_frame_is_refused() {
    // Tag of `LogChunk`, then fields, then a data length of 2^40 bytes
    // (bincode varint: 0xfd + u64 LE) with nothing behind it.
    let mut bytes = codec::encode(&AgentMsg::LogChunk(cosmos_proto::LogChunk {
        attempt_id: cosmos_proto::AttemptId(1),
        stream: cosmos_proto::LogStream::Stdout,
        offset: 0,
        data: vec![],
    }))
    .unwrap();
    bytes.pop();
    bytes.push(0xfd);
    bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let err = codec::decode::<AgentMsg>(&bytes).unwrap_err();
    assert!(matches!(err, CodecError::Garbage(_)), "{err}");
}

#[test]
fn handshake_header_errors_are_typed() {
    assert!(matches!(handshake::decode_payload::<Hello>(b"GET / HTTP/1.1\r\n"), Err(HandshakeError::BadMagic)));
    assert!(matches!(handshake::decode_payload::<Hello>(b"CSM"), Err(HandshakeError::Truncated { len: 3 })));
    let future = handshake::encode_payload_with_version(&"anything", cosmos_proto::PROTOCOL_VERSION + 1).unwrap();
    assert!(matches!(
        handshake::decode_payload::<Hello>(&future),
        Err(HandshakeError::VersionMismatch { theirs, .. }) if theirs == cosmos_proto::PROTOCOL_VERSION + 1
    ));
}
