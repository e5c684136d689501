//! Frame size limits are enforced before allocation; truncation is typed.

use bytes::BytesMut;
use cosmos_proto::frame::{FRAME_BYTES_MAX_CAP, FRAME_HEADER_BYTES, encode_frame};
use cosmos_proto::{FrameDecoder, FrameError, FrameReader};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Records the largest single allocation made by the current thread, so a
/// test can prove a refusal happened without buffering the announced size.
struct PeakAlloc;

thread_local! {
    static LARGEST_BYTES: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST_BYTES.try_with(|c| c.set(c.get().max(layout.size())));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST_BYTES.try_with(|c| c.set(c.get().max(new_size)));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

fn largest_allocation_during(f: impl FnOnce()) -> usize {
    LARGEST_BYTES.with(|c| c.set(0));
    f();
    LARGEST_BYTES.with(|c| c.get())
}

const FOUR_GIB_HEADER: [u8; 4] = [0xff, 0xff, 0xff, 0xff];

#[test]
fn a_frame_announcing_4_gib_is_refused_without_allocating_it() {
    let decoder = FrameDecoder::new(FRAME_BYTES_MAX_CAP);
    let mut buf = BytesMut::from(&FOUR_GIB_HEADER[..]);
    let mut result = None;
    let peak = largest_allocation_during(|| result = Some(decoder.decode(&mut buf)));
    assert!(matches!(result, Some(Err(FrameError::Oversized { len_bytes: 0xffff_ffff, .. }))), "{result:?}");
    assert!(peak < 1024, "refusing the frame allocated {peak} bytes");
}

#[tokio::test(flavor = "current_thread")]
async fn a_reader_refuses_a_4_gib_frame_without_allocating_it() {
    let (mut client, server) = tokio::io::duplex(64);
    use tokio::io::AsyncWriteExt;
    client.write_all(&FOUR_GIB_HEADER).await.unwrap();
    client.write_all(&[0u8; 32]).await.unwrap();
    let mut reader = FrameReader::new(server, FRAME_BYTES_MAX_CAP);
    LARGEST_BYTES.with(|c| c.set(0));
    let result = reader.read_frame().await;
    let peak = LARGEST_BYTES.with(|c| c.get());
    assert!(matches!(result, Err(FrameError::Oversized { .. })), "{result:?}");
    assert!(peak < 64 * 1024, "refusing the frame allocated {peak} bytes");
}

#[test]
fn the_configured_limit_is_enforced_on_both_sides() {
    let decoder = FrameDecoder::new(100);
    let mut ok = BytesMut::new();
    encode_frame(&[7u8; 100], 100, &mut ok).unwrap();
    assert_eq!(decoder.decode(&mut ok).unwrap().unwrap().len(), 100);

    let mut out = BytesMut::new();
    assert!(matches!(
        encode_frame(&[7u8; 101], 100, &mut out),
        Err(FrameError::Oversized { len_bytes: 101, frame_bytes_max: 100 })
    ));
    let mut big = BytesMut::new();
    encode_frame(&[7u8; 101], 1000, &mut big).unwrap();
    assert!(matches!(decoder.decode(&mut big), Err(FrameError::Oversized { len_bytes: 101, .. })));
}

#[test]
fn a_limit_above_the_cap_is_lowered_to_the_cap() {
    assert_eq!(FrameDecoder::new(u32::MAX).frame_bytes_max(), FRAME_BYTES_MAX_CAP);
}

#[test]
fn truncated_frames_say_how_much_was_missing() {
    let decoder = FrameDecoder::default();
    let mut frame = BytesMut::new();
    encode_frame(b"hello world", 1024, &mut frame).unwrap();
    for cut in 1..frame.len() {
        let mut partial = BytesMut::from(&frame[..cut]);
        assert_eq!(decoder.decode(&mut partial).unwrap(), None, "cut at {cut}");
        match decoder.decode_eof(&mut partial) {
            Err(FrameError::Truncated { need_bytes, have_bytes }) => {
                assert_eq!(have_bytes, cut);
                let expected = if cut < FRAME_HEADER_BYTES { FRAME_HEADER_BYTES } else { frame.len() };
                assert_eq!(need_bytes, expected);
            }
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_reader_reports_a_stream_cut_mid_frame_and_a_clean_close() {
    use tokio::io::AsyncWriteExt;
    let (mut client, server) = tokio::io::duplex(1024);
    let mut frame = BytesMut::new();
    encode_frame(b"first", 1024, &mut frame).unwrap();
    encode_frame(b"second", 1024, &mut frame).unwrap();
    client.write_all(&frame[..frame.len() - 2]).await.unwrap();
    drop(client);
    let mut reader = FrameReader::new(server, 1024);
    assert_eq!(&reader.read_frame().await.unwrap().unwrap()[..], b"first");
    assert!(matches!(reader.read_frame().await, Err(FrameError::Truncated { have_bytes: 8, need_bytes: 10 })));

    let (client, server) = tokio::io::duplex(1024);
    drop(client);
    assert_eq!(FrameReader::new(server, 1024).read_frame().await.unwrap(), None);
}

/// A frame header announcing `len_bytes`.
fn header(len_bytes: u32) -> BytesMut {
    BytesMut::from(&len_bytes.to_be_bytes()[..])
}

#[test]
fn the_default_limit_is_4_mib_and_no_reader_takes_more_than_16_mib() {
    let default = FrameDecoder::default();
    assert!(matches!(default.decode(&mut header(4 << 20)), Ok(None)), "4 MiB: waits for the payload");
    assert!(matches!(default.decode(&mut header((4 << 20) + 1)), Err(FrameError::Oversized { .. })));
    let asked_for_more = FrameDecoder::new(u32::MAX);
    assert!(matches!(asked_for_more.decode(&mut header(16 << 20)), Ok(None)));
    assert!(matches!(asked_for_more.decode(&mut header((16 << 20) + 1)), Err(FrameError::Oversized { .. })));
}

#[test]
fn an_oversized_frame_is_terminal_and_a_broken_stream_worth_a_reconnect() {
    use cosmos_proto::{Classify, Retry};
    assert_eq!(FrameError::Oversized { len_bytes: 5 << 20, frame_bytes_max: 4 << 20 }.retry(), Retry::Terminal);
    assert_eq!(FrameError::Truncated { need_bytes: 8, have_bytes: 2 }.retry(), Retry::Retryable);
    assert_eq!(FrameError::Io(std::io::Error::other("connection reset")).retry(), Retry::Retryable);
}
