//! Blob frames share the connection with messages: each decodes as what it
//! is, whatever is interleaved, and a chunk's checksum catches a flipped bit.

mod common;

use cosmos_proto::{
    AgentBlob, AgentFrame, AgentMsg, BLOB_FRAME_TAG, BlobChunk, ControllerBlob, ControllerFrame, ControllerMsg, Sha256,
    codec, encode_agent_chunk_into, encode_blob, encode_controller_chunk_into,
};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn agent_frames_decode_as_message_or_blob(msg in common::agent_msg(), blob in common::agent_blob()) {
        prop_assert_eq!(AgentFrame::decode(&codec::encode(&msg).unwrap()).unwrap(), AgentFrame::Msg(msg));
        prop_assert_eq!(AgentFrame::decode(&encode_blob(&blob).unwrap()).unwrap(), AgentFrame::Blob(blob));
    }

    #[test]
    fn controller_frames_decode_as_message_or_blob(msg in common::controller_msg(), blob in common::controller_blob()) {
        prop_assert_eq!(ControllerFrame::decode(&codec::encode(&msg).unwrap()).unwrap(), ControllerFrame::Msg(msg));
        prop_assert_eq!(ControllerFrame::decode(&encode_blob(&blob).unwrap()).unwrap(), ControllerFrame::Blob(blob));
    }

    #[test]
    fn no_message_starts_with_the_blob_tag(a in common::agent_msg(), c in common::controller_msg()) {
        prop_assert_ne!(codec::encode(&a).unwrap()[0], BLOB_FRAME_TAG);
        prop_assert_ne!(codec::encode(&c).unwrap()[0], BLOB_FRAME_TAG);
    }

    #[test]
    fn borrowed_chunk_encodings_match_the_owned_ones(
        data in prop::collection::vec(any::<u8>(), 0..4096),
        offset in any::<u64>(),
        sha in any::<[u8; 32]>(),
    ) {
        let chunk = BlobChunk::new(Sha256(sha), offset, data.clone());
        let mut down = b"prefix".to_vec();
        encode_controller_chunk_into(Sha256(sha), offset, &data, &mut down).unwrap();
        prop_assert_eq!(&down[6..], &encode_blob(&ControllerBlob::Chunk(chunk.clone())).unwrap()[..]);
        prop_assert_eq!(ControllerFrame::decode(&down[6..]).unwrap(), ControllerFrame::Blob(ControllerBlob::Chunk(chunk.clone())));
        let mut up = Vec::new();
        encode_agent_chunk_into(Sha256(sha), offset, &data, &mut up).unwrap();
        prop_assert_eq!(&up[..], &encode_blob(&AgentBlob::Chunk(chunk.clone())).unwrap()[..]);
        prop_assert_eq!(AgentFrame::decode(&up).unwrap(), AgentFrame::Blob(AgentBlob::Chunk(chunk)));
    }

    #[test]
    fn any_flipped_bit_in_a_chunk_is_caught(data in prop::collection::vec(any::<u8>(), 1..4096), bit in any::<usize>()) {
        let mut chunk = BlobChunk::new(Sha256([7; 32]), 0, data);
        prop_assert!(chunk.is_intact());
        let bit = bit % (chunk.data.len() * 8);
        chunk.data[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(!chunk.is_intact());
    }
}

#[test]
fn a_full_size_chunk_fits_a_default_frame() {
    let chunk = BlobChunk::new(Sha256([1; 32]), u64::MAX, vec![0xAB; cosmos_proto::BLOB_CHUNK_BYTES as usize]);
    let payload = encode_blob(&ControllerBlob::Chunk(chunk)).unwrap();
    assert!(payload.len() < cosmos_proto::frame::FRAME_BYTES_MAX_DEFAULT as usize);
    let upload = encode_blob(&AgentBlob::Request { sha256: Sha256([1; 32]), offset: 0, len_bytes: 1 }).unwrap();
    assert!(matches!(AgentFrame::decode(&upload), Ok(AgentFrame::Blob(_))));
    // A plain message stays decodable by peers that know nothing of blobs.
    let plain = codec::encode(&ControllerMsg::HeartbeatAck { seq: 3 }).unwrap();
    assert_eq!(codec::decode::<ControllerMsg>(&plain).unwrap(), ControllerMsg::HeartbeatAck { seq: 3 });
    assert!(codec::decode::<AgentMsg>(&upload).is_err());
}
