//! The agent's blob flow (inputs staged, outputs delivered) as a state machine, through its public API.

use cosmos_agent_core::blobs::machine::*;
use cosmos_proto::*;

const ATT: AttemptId = AttemptId(7);
const SHA: Sha256 = Sha256([9; 32]);

fn events(flow: &mut Flow) -> Vec<Event> {
    std::iter::from_fn(|| flow.poll_event()).collect()
}

fn transmits(flow: &mut Flow, now_ms: u64) -> Vec<Transmit> {
    std::iter::from_fn(|| flow.poll_transmit(now_ms)).collect()
}

fn request_offsets(t: &[Transmit]) -> Vec<u64> {
    t.iter()
        .map(|t| match t {
            Transmit::Request { offset, .. } => *offset / CHUNK_BYTES,
            other => panic!("not a request: {other:?}"),
        })
        .collect()
}

/// A flow staging one input of `chunks` chunks, with `have_chunks` on disk, its first requests sent.
fn downloading(chunks: u64, have_chunks: u64) -> (Flow, Vec<Transmit>) {
    let mut flow = Flow::new();
    flow.link_up(0);
    flow.stage(ATT, &[(SHA, chunks * CHUNK_BYTES)]);
    assert_eq!(events(&mut flow), vec![Event::Resolve { sha256: SHA, size_bytes: chunks * CHUNK_BYTES }]);
    flow.resolved(0, SHA, Resolution::Fetch { have_bytes: have_chunks * CHUNK_BYTES });
    let start =
        Event::WriterStart { sha256: SHA, start_bytes: have_chunks * CHUNK_BYTES, size_bytes: chunks * CHUNK_BYTES };
    let mut expected = vec![start];
    if have_chunks == chunks {
        expected.push(Event::WriterClose { sha256: SHA });
    }
    assert_eq!(events(&mut flow), expected);
    let sent = transmits(&mut flow, 0);
    (flow, sent)
}

fn accept(flow: &mut Flow, now_ms: u64, chunk: u64) -> bool {
    let ok = flow.on_chunk(now_ms, SHA, chunk * CHUNK_BYTES, CHUNK_BYTES, true);
    if ok {
        flow.on_written(SHA, (chunk + 1) * CHUNK_BYTES);
    }
    ok
}

#[test]
fn a_download_asks_no_more_than_its_window_and_resumes_from_the_bytes_on_disk() {
    let (mut flow, sent) = downloading(20, 3);
    let window = (BLOB_WINDOW_BYTES / CHUNK_BYTES) as usize;
    assert_eq!(request_offsets(&sent), (3..3 + window as u64).collect::<Vec<_>>());
    assert!(accept(&mut flow, 1, 3));
    assert_eq!(request_offsets(&transmits(&mut flow, 1)), vec![3 + window as u64], "one written, one more asked");
}

#[test]
fn a_stalled_download_is_asked_again_from_where_its_good_bytes_end() {
    let (mut flow, _) = downloading(20, 0);
    assert!(accept(&mut flow, 10, 0));
    assert!(accept(&mut flow, 20, 1));
    assert_eq!(flow.poll_timeout(), Some(20 + BLOB_STALL_TIMEOUT_MS));
    let _ = transmits(&mut flow, 20);
    flow.handle_timeout(20 + BLOB_STALL_TIMEOUT_MS - 1);
    assert!(transmits(&mut flow, 20).is_empty(), "not stalled yet");
    flow.handle_timeout(20 + BLOB_STALL_TIMEOUT_MS);
    let again = request_offsets(&transmits(&mut flow, 20 + BLOB_STALL_TIMEOUT_MS));
    assert_eq!(again.first(), Some(&2), "asked again from the first byte not accepted: {again:?}");
    // A chunk asked for before the rewind, arriving late, is one the rewound requests bring again.
    assert!(!accept(&mut flow, 30_000, 5));
    assert!(accept(&mut flow, 30_000, 2));
}

#[test]
fn a_duplicate_or_out_of_order_chunk_is_refused() {
    let (mut flow, _) = downloading(4, 0);
    assert!(accept(&mut flow, 1, 0));
    assert!(!accept(&mut flow, 2, 0), "the same bytes twice");
    assert!(!accept(&mut flow, 3, 2), "past a gap");
    assert!(accept(&mut flow, 4, 1));
}

#[test]
fn a_corrupt_chunk_is_refused_and_asked_again() {
    let (mut flow, _) = downloading(4, 0);
    assert!(!flow.on_chunk(1, SHA, 0, CHUNK_BYTES, false));
    let again = request_offsets(&transmits(&mut flow, 1));
    assert_eq!(again, vec![0, 1, 2, 3]);
    assert!(accept(&mut flow, 2, 0));
}

#[test]
fn a_link_cut_resumes_every_download_from_its_good_bytes() {
    let (mut flow, _) = downloading(12, 0);
    assert!(accept(&mut flow, 1, 0));
    flow.link_down();
    assert!(transmits(&mut flow, 2).is_empty(), "nothing goes out without a link");
    flow.link_up(3);
    assert_eq!(request_offsets(&transmits(&mut flow, 3)).first(), Some(&1));
}

#[test]
fn the_last_byte_closes_the_writer_and_a_stored_blob_makes_the_inputs_ready() {
    let (mut flow, _) = downloading(2, 0);
    assert!(accept(&mut flow, 1, 0));
    assert!(accept(&mut flow, 2, 1));
    assert_eq!(events(&mut flow), vec![Event::WriterClose { sha256: SHA }]);
    assert!(!accept(&mut flow, 3, 1), "nothing is accepted while committing");
    flow.on_commit(4, SHA, Commit::Stored);
    assert_eq!(events(&mut flow), vec![Event::InputsReady { attempt_id: ATT }]);
    assert!(flow.is_idle());
}

#[test]
fn a_digest_mismatch_refetches_from_nothing_then_fails_for_good() {
    // Every byte was on disk already: the writer closed at once, and its commit finds them bad.
    let (mut flow, _) = downloading(1, 1);
    flow.on_commit(1, SHA, Commit::DigestMismatch);
    let restart = Event::WriterStart { sha256: SHA, start_bytes: 0, size_bytes: CHUNK_BYTES };
    assert_eq!(events(&mut flow), vec![restart]);
    assert_eq!(request_offsets(&transmits(&mut flow, 1)), vec![0]);
    assert!(accept(&mut flow, 2, 0));
    let _ = events(&mut flow);
    flow.on_commit(3, SHA, Commit::DigestMismatch);
    match events(&mut flow).as_slice() {
        [Event::StageFailed { attempt_id: ATT, failure }] => {
            assert!(!failure.retry.is_retryable());
            assert!(failure.reason.contains("did not match its digest"), "{}", failure.reason);
        }
        other => panic!("{other:?}"),
    }
    assert!(flow.is_idle());
}

#[test]
fn a_missing_blob_fails_the_stage_for_good() {
    let (mut flow, _) = downloading(3, 0);
    flow.on_missing(SHA, "nobody uploaded it".into());
    let got = events(&mut flow);
    assert_eq!(got[0], Event::WriterDrop { sha256: SHA });
    assert!(matches!(&got[1], Event::StageFailed { failure, .. } if !failure.retry.is_retryable()));
}

#[test]
fn an_aborted_stage_drops_its_download_and_answers_nothing() {
    let (mut flow, _) = downloading(3, 0);
    flow.abort_stage(ATT);
    assert_eq!(events(&mut flow), vec![Event::WriterDrop { sha256: SHA }]);
    assert!(!accept(&mut flow, 1, 0));
    assert!(flow.is_idle());
}

fn uploading(chunks: u64) -> Flow {
    let mut flow = Flow::new();
    flow.link_up(0);
    flow.upload(0, ATT, &[(SHA, chunks * CHUNK_BYTES)]);
    assert_eq!(transmits(&mut flow, 0), vec![Transmit::Offer { sha256: SHA, size_bytes: chunks * CHUNK_BYTES }]);
    flow
}

fn chunk_offsets(t: &[Transmit]) -> Vec<u64> {
    t.iter()
        .map(|t| match t {
            Transmit::Chunk { offset, .. } => *offset / CHUNK_BYTES,
            other => panic!("not a chunk: {other:?}"),
        })
        .collect()
}

#[test]
fn an_upload_starts_where_the_controller_says_and_resumes_there_after_a_cut() {
    let mut flow = uploading(4);
    flow.on_resume(1, SHA, 2 * CHUNK_BYTES);
    assert_eq!(chunk_offsets(&transmits(&mut flow, 1)), vec![2, 3]);
    flow.on_ack(2, SHA, 3 * CHUNK_BYTES);
    flow.link_down();
    flow.link_up(3);
    assert_eq!(transmits(&mut flow, 3), vec![Transmit::Offer { sha256: SHA, size_bytes: 4 * CHUNK_BYTES }]);
    flow.on_resume(4, SHA, 3 * CHUNK_BYTES);
    assert_eq!(chunk_offsets(&transmits(&mut flow, 4)), vec![3]);
    flow.on_stored(SHA);
    assert_eq!(events(&mut flow), vec![Event::Delivered { attempt_id: ATT }]);
}

#[test]
fn an_ack_for_bytes_never_sent_is_ignored() {
    let mut flow = uploading(12);
    flow.on_resume(1, SHA, 0);
    let window = BLOB_WINDOW_BYTES / CHUNK_BYTES;
    assert_eq!(chunk_offsets(&transmits(&mut flow, 1)), (0..window).collect::<Vec<_>>());
    flow.on_ack(2, SHA, 20 * CHUNK_BYTES);
    assert!(transmits(&mut flow, 2).is_empty(), "the window is still full");
    flow.on_ack(3, SHA, CHUNK_BYTES);
    assert_eq!(chunk_offsets(&transmits(&mut flow, 3)), vec![window]);
}

#[test]
fn an_unanswered_offer_is_made_again_after_the_stall_timeout() {
    let mut flow = uploading(1);
    assert_eq!(flow.poll_timeout(), Some(BLOB_STALL_TIMEOUT_MS));
    flow.handle_timeout(BLOB_STALL_TIMEOUT_MS);
    assert_eq!(
        transmits(&mut flow, BLOB_STALL_TIMEOUT_MS),
        vec![Transmit::Offer { sha256: SHA, size_bytes: CHUNK_BYTES }]
    );
}

#[test]
fn retryable_refusals_use_up_the_budget_then_delivery_fails() {
    let mut flow = uploading(1);
    for _ in 1..UPLOAD_TRIES_MAX {
        flow.on_resume(1, SHA, 0);
        let _ = transmits(&mut flow, 1);
        flow.on_refused(SHA, "store busy".into(), cosmos_proto::Retry::Retryable);
        assert_eq!(transmits(&mut flow, 1), vec![Transmit::Offer { sha256: SHA, size_bytes: CHUNK_BYTES }]);
        // A second refusal before the offer is answered is of chunks already in flight: it does not count.
        flow.on_refused(SHA, "store busy".into(), cosmos_proto::Retry::Retryable);
        assert!(events(&mut flow).is_empty());
    }
    flow.on_resume(1, SHA, 0);
    flow.on_refused(SHA, "store busy".into(), cosmos_proto::Retry::Retryable);
    match events(&mut flow).as_slice() {
        [Event::DeliveryFailed { attempt_id: ATT, reason }] => assert!(reason.contains("store busy")),
        other => panic!("{other:?}"),
    }
    assert!(flow.is_idle());
}

#[test]
fn a_final_refusal_fails_delivery_at_once() {
    let mut flow = uploading(1);
    flow.on_resume(1, SHA, 0);
    flow.on_refused(SHA, "past the announced size".into(), cosmos_proto::Retry::Terminal);
    assert!(matches!(events(&mut flow).as_slice(), [Event::DeliveryFailed { .. }]));
}

#[test]
fn empty_stages_and_deliveries_answer_at_once() {
    let mut flow = Flow::new();
    flow.stage(ATT, &[]);
    flow.upload(0, AttemptId(8), &[]);
    assert_eq!(
        events(&mut flow),
        vec![Event::InputsReady { attempt_id: ATT }, Event::Delivered { attempt_id: AttemptId(8) }]
    );
}
