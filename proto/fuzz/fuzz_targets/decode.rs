//! Feeds arbitrary bytes to every decoder a peer can reach: frames, the
//! handshake, and both message directions. Any panic or abort is a bug.
#![no_main]

use bytes::BytesMut;
use cosmos_proto::handshake::{self, Hello, HelloReply};
use cosmos_proto::{AgentMsg, ControllerMsg, FrameDecoder, codec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoder = FrameDecoder::new(1 << 20);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decoder.decode(&mut buf) {
        let _ = codec::decode::<AgentMsg>(&frame);
        let _ = codec::decode::<ControllerMsg>(&frame);
        let _ = handshake::decode_payload::<Hello>(&frame);
        let _ = handshake::decode_payload::<HelloReply>(&frame);
    }
    let _ = decoder.decode_eof(&mut buf);
    let _ = codec::decode::<AgentMsg>(data);
    let _ = codec::decode::<ControllerMsg>(data);
});
