//! Every message survives encode → frame → split delivery → decode unchanged.

mod common;

use bytes::BytesMut;
use cosmos_proto::frame::{FRAME_BYTES_MAX_DEFAULT, encode_frame};
use cosmos_proto::{FrameDecoder, codec, handshake};
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

/// Frames several messages into one stream, delivers it in pieces cut at
/// `cuts`, and checks the decoder yields the same messages in order.
fn round_trip<M: Serialize + DeserializeOwned + PartialEq + Debug>(msgs: &[M], cuts: &[usize]) {
    let mut wire = BytesMut::new();
    for msg in msgs {
        encode_frame(&codec::encode(msg).unwrap(), FRAME_BYTES_MAX_DEFAULT, &mut wire).unwrap();
    }
    let wire = wire.freeze();
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    points.push(wire.len());
    points.sort_unstable();

    let decoder = FrameDecoder::default();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut start = 0;
    for end in points {
        buf.extend_from_slice(&wire[start..end]);
        start = end;
        while let Some(frame) = decoder.decode(&mut buf).unwrap() {
            got.push(codec::decode::<M>(&frame).unwrap());
        }
    }
    assert_eq!(decoder.decode_eof(&mut buf).unwrap(), None);
    assert_eq!(got.as_slice(), msgs);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn agent_messages_round_trip(msgs in prop::collection::vec(common::agent_msg(), 1..4), cuts in prop::collection::vec(any::<usize>(), 0..6)) {
        round_trip(&msgs, &cuts);
    }

    #[test]
    fn controller_messages_round_trip(msgs in prop::collection::vec(common::controller_msg(), 1..4), cuts in prop::collection::vec(any::<usize>(), 0..6)) {
        round_trip(&msgs, &cuts);
    }

    #[test]
    fn job_specs_round_trip(spec in common::job_spec()) {
        round_trip(&[spec], &[]);
    }

    #[test]
    fn handshake_bodies_round_trip(hello in common::hello(), reply in common::hello_reply()) {
        let decoded: handshake::Hello = handshake::decode_payload(&handshake::encode_payload(&hello).unwrap()).unwrap();
        prop_assert_eq!(decoded, hello);
        let decoded: handshake::HelloReply = handshake::decode_payload(&handshake::encode_payload(&reply).unwrap()).unwrap();
        prop_assert_eq!(decoded, reply);
    }
}
