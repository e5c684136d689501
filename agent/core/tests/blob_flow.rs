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
            let tries = format!("did not match its digest after {DOWNLOAD_DIGEST_TRIES_MAX} downloads");
            assert!(failure.reason.contains(&tries), "{}", failure.reason);
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
    flow.handle_timeout(BLOB_STALL_TIMEOUT_MS - 1);
    assert!(transmits(&mut flow, BLOB_STALL_TIMEOUT_MS - 1).is_empty(), "not stalled yet");
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

#[test]
fn a_download_two_attempts_wait_for_survives_the_abort_of_one() {
    let (mut flow, _) = downloading(2, 0);
    let other = AttemptId(8);
    flow.stage(other, &[(SHA, 2 * CHUNK_BYTES)]);
    assert!(events(&mut flow).is_empty(), "the blob is being fetched already");
    flow.abort_stage(ATT);
    assert!(events(&mut flow).is_empty(), "the other attempt still waits for it: {:?}", flow);
    assert!(accept(&mut flow, 1, 0) && accept(&mut flow, 2, 1));
    assert_eq!(events(&mut flow), vec![Event::WriterClose { sha256: SHA }]);
    flow.on_commit(3, SHA, Commit::Stored);
    assert_eq!(events(&mut flow), vec![Event::InputsReady { attempt_id: other }]);
}

#[test]
fn a_chunk_reaching_past_the_blobs_size_is_refused() {
    let (mut flow, _) = downloading(2, 0);
    assert!(accept(&mut flow, 1, 0));
    assert!(!flow.on_chunk(2, SHA, CHUNK_BYTES, 2 * CHUNK_BYTES, true));
    assert!(accept(&mut flow, 3, 1), "asked again, the right piece is taken");
}

#[test]
fn an_aborted_delivery_stops_its_upload() {
    let mut flow = uploading(4);
    flow.on_resume(1, SHA, 0);
    assert!(!transmits(&mut flow, 1).is_empty());
    flow.abort_upload(ATT);
    assert!(!flow.uploading(&SHA));
    assert!(flow.is_idle());
    flow.on_ack(2, SHA, CHUNK_BYTES);
    assert!(transmits(&mut flow, 2).is_empty(), "nothing more of it is sent");
    flow.on_stored(SHA);
    assert!(events(&mut flow).is_empty(), "an aborted delivery is answered by nothing");
}

#[test]
fn an_output_that_cannot_be_read_is_not_sent_further_and_is_offered_again_once_stalled() {
    let mut flow = uploading(12);
    flow.on_resume(1, SHA, 0);
    let window = BLOB_WINDOW_BYTES / CHUNK_BYTES;
    assert_eq!(chunk_offsets(&transmits(&mut flow, 1)), (0..window).collect::<Vec<_>>());
    flow.chunk_unreadable(SHA);
    flow.on_ack(2, SHA, CHUNK_BYTES);
    assert!(transmits(&mut flow, 2).is_empty(), "no chunk after one that could not be read");
    flow.handle_timeout(1 + BLOB_STALL_TIMEOUT_MS);
    assert_eq!(
        transmits(&mut flow, 1 + BLOB_STALL_TIMEOUT_MS),
        vec![Transmit::Offer { sha256: SHA, size_bytes: 12 * CHUNK_BYTES }]
    );
}

#[test]
fn only_an_ack_of_new_bytes_sent_counts_as_progress_against_the_stall_timeout() {
    let mut flow = uploading(12);
    flow.on_resume(1, SHA, 0);
    let _ = transmits(&mut flow, 1);
    assert_eq!(flow.poll_timeout(), Some(1 + BLOB_STALL_TIMEOUT_MS));
    flow.on_ack(5, SHA, 20 * CHUNK_BYTES);
    assert_eq!(flow.poll_timeout(), Some(1 + BLOB_STALL_TIMEOUT_MS), "bytes never sent");
    flow.on_ack(6, SHA, CHUNK_BYTES);
    assert_eq!(flow.poll_timeout(), Some(6 + BLOB_STALL_TIMEOUT_MS), "new bytes");
    flow.on_ack(7, SHA, CHUNK_BYTES);
    assert_eq!(flow.poll_timeout(), Some(6 + BLOB_STALL_TIMEOUT_MS), "the same bytes again");
}

const SHAS: [Sha256; 3] = [Sha256([1; 32]), Sha256([2; 32]), Sha256([3; 32])];

fn chunks_of(t: &[Transmit], sha: Sha256) -> usize {
    t.iter()
        .filter(|t| matches!(t, Transmit::Request { sha256, .. } | Transmit::Chunk { sha256, .. } if *sha256 == sha))
        .count()
}

#[test]
fn the_last_piece_of_a_blob_is_asked_for_and_sent_at_its_own_length() {
    let size = 2 * CHUNK_BYTES + CHUNK_BYTES / 2;
    let mut flow = Flow::new();
    flow.link_up(0);
    flow.stage(ATT, &[(SHA, size)]);
    flow.resolved(0, SHA, Resolution::Fetch { have_bytes: 0 });
    let asked: Vec<(u64, u32)> = transmits(&mut flow, 0)
        .into_iter()
        .map(|t| match t {
            Transmit::Request { offset, len_bytes, .. } => (offset, len_bytes),
            other => panic!("{other:?}"),
        })
        .collect();
    let chunk = CHUNK_BYTES as u32;
    assert_eq!(asked, [(0, chunk), (CHUNK_BYTES, chunk), (2 * CHUNK_BYTES, chunk / 2)]);

    let mut flow = Flow::new();
    flow.link_up(0);
    flow.upload(0, ATT, &[(SHA, size)]);
    flow.on_resume(1, SHA, 0);
    let sent: Vec<(u64, u32)> = transmits(&mut flow, 1)
        .into_iter()
        .filter_map(|t| match t {
            Transmit::Chunk { offset, len_bytes, .. } => Some((offset, len_bytes)),
            _ => None,
        })
        .collect();
    assert_eq!(sent, [(0, chunk), (CHUNK_BYTES, chunk), (2 * CHUNK_BYTES, chunk / 2)]);
}

#[test]
fn the_stall_clock_starts_when_a_transfer_with_nothing_in_flight_sends() {
    let mut flow = Flow::new();
    flow.link_up(0);
    flow.stage(ATT, &[(SHA, CHUNK_BYTES)]);
    flow.resolved(0, SHA, Resolution::Fetch { have_bytes: 0 });
    assert_eq!(request_offsets(&transmits(&mut flow, 100)), [0]);
    assert_eq!(flow.poll_timeout(), Some(100 + BLOB_STALL_TIMEOUT_MS), "from the request, not the lookup");

    let mut flow = uploading(1);
    flow.on_resume(1, SHA, 0);
    assert_eq!(chunk_offsets(&transmits(&mut flow, 50)), [0]);
    assert_eq!(flow.poll_timeout(), Some(50 + BLOB_STALL_TIMEOUT_MS), "from the chunk, not the resume");
}

#[test]
fn the_flow_tells_which_blobs_move_which_attempts_wait_and_when_all_is_still() {
    let mut flow = Flow::new();
    flow.link_up(0);
    assert!(flow.is_idle());
    flow.stage(ATT, &[(SHA, CHUNK_BYTES)]);
    assert!(!flow.is_idle(), "looking it up");
    // An aborted stage leaves the lookup running; the flow is busy until the cache answers.
    flow.abort_stage(ATT);
    assert!(!flow.is_idle(), "the cache has not answered yet");
    flow.resolved(0, SHA, Resolution::Ready);
    assert!(flow.is_idle());

    flow.stage(ATT, &[(SHA, CHUNK_BYTES)]);
    flow.resolved(0, SHA, Resolution::Fetch { have_bytes: 0 });
    assert!(flow.downloading(&SHA) && !flow.uploading(&SHA));
    flow.upload(0, AttemptId(8), &[(SHAS[0], CHUNK_BYTES)]);
    assert!(flow.uploading(&SHAS[0]) && !flow.downloading(&SHAS[0]));
    assert_eq!(flow.busy_attempts().collect::<Vec<_>>(), [ATT, AttemptId(8)]);
    let _ = events(&mut flow);
    let _ = transmits(&mut flow, 0);
    assert!(accept(&mut flow, 1, 0));
    flow.on_commit(2, SHA, Commit::Stored);
    assert!(!flow.downloading(&SHA));
    assert!(!flow.is_idle(), "still delivering");
    flow.on_resume(3, SHAS[0], 0);
    let _ = transmits(&mut flow, 3);
    flow.on_ack(4, SHAS[0], CHUNK_BYTES);
    flow.on_stored(SHAS[0]);
    assert!(!flow.uploading(&SHAS[0]));
    assert_eq!(flow.busy_attempts().count(), 0);
    assert!(flow.is_idle());
}

#[test]
fn an_attempt_with_two_inputs_is_ready_when_both_are_and_a_blob_is_looked_up_once() {
    let mut flow = Flow::new();
    flow.link_up(0);
    flow.stage(ATT, &[(SHAS[0], CHUNK_BYTES), (SHAS[1], CHUNK_BYTES)]);
    flow.stage(AttemptId(8), &[(SHAS[0], CHUNK_BYTES)]);
    let lookups: Vec<Event> = events(&mut flow);
    assert_eq!(
        lookups,
        [
            Event::Resolve { sha256: SHAS[0], size_bytes: CHUNK_BYTES },
            Event::Resolve { sha256: SHAS[1], size_bytes: CHUNK_BYTES }
        ],
        "one lookup per blob however many wait for it"
    );
    flow.resolved(1, SHAS[0], Resolution::Ready);
    assert_eq!(events(&mut flow), [Event::InputsReady { attempt_id: AttemptId(8) }], "ATT still waits for one");
    flow.resolved(2, SHAS[1], Resolution::Ready);
    assert_eq!(events(&mut flow), [Event::InputsReady { attempt_id: ATT }]);
}

#[test]
fn every_blob_together_keeps_to_the_connections_window() {
    let size = 20 * CHUNK_BYTES;
    let (blob_window, conn_window) = (BLOB_WINDOW_BYTES / CHUNK_BYTES, CONN_WINDOW_BYTES / CHUNK_BYTES);
    assert!(3 * blob_window > conn_window, "three blobs can fill the connection's window");
    let mut flow = Flow::new();
    flow.link_up(0);
    flow.stage(ATT, &SHAS.map(|s| (s, size)));
    for sha in SHAS {
        flow.resolved(0, sha, Resolution::Fetch { have_bytes: 0 });
    }
    let first = transmits(&mut flow, 0);
    assert_eq!(first.len() as u64, conn_window, "{first:?}");
    assert_eq!(chunks_of(&first, SHAS[2]) as u64, conn_window - 2 * blob_window);
    assert!(flow.on_chunk(1, SHAS[0], 0, CHUNK_BYTES, true));
    flow.on_written(SHAS[0], CHUNK_BYTES);
    assert_eq!(transmits(&mut flow, 1).len(), 1, "one piece on disk, one more asked");

    let mut flow = Flow::new();
    flow.link_up(0);
    flow.upload(0, ATT, &SHAS.map(|s| (s, size)));
    for sha in SHAS {
        flow.on_resume(1, sha, 0);
    }
    let sent: Vec<Transmit> =
        transmits(&mut flow, 1).into_iter().filter(|t| matches!(t, Transmit::Chunk { .. })).collect();
    assert_eq!(sent.len() as u64, conn_window);
    flow.on_ack(2, SHAS[0], CHUNK_BYTES);
    assert_eq!(transmits(&mut flow, 2).len(), 1, "one piece acknowledged, one more sent");
}

#[test]
fn a_download_waiting_on_its_own_disk_is_not_stalled() {
    let (mut flow, sent) = downloading(20, 0);
    for chunk in 0..sent.len() as u64 {
        assert!(flow.on_chunk(1, SHA, chunk * CHUNK_BYTES, CHUNK_BYTES, true), "the writer lags behind");
    }
    assert!(transmits(&mut flow, 1).is_empty(), "the window waits for the disk");
    assert_eq!(flow.poll_timeout(), None, "nothing is asked of the controller");
    flow.handle_timeout(1 + 2 * BLOB_STALL_TIMEOUT_MS);
    assert!(transmits(&mut flow, 1 + 2 * BLOB_STALL_TIMEOUT_MS).is_empty());
}

#[test]
fn an_upload_stalls_with_chunks_unanswered_or_all_acknowledged_and_not_stored() {
    let mut flow = uploading(2);
    flow.on_resume(1, SHA, 0);
    assert_eq!(chunk_offsets(&transmits(&mut flow, 1)), [0, 1]);
    flow.handle_timeout(1 + BLOB_STALL_TIMEOUT_MS);
    assert_eq!(
        transmits(&mut flow, 1 + BLOB_STALL_TIMEOUT_MS),
        [Transmit::Offer { sha256: SHA, size_bytes: 2 * CHUNK_BYTES }]
    );

    let mut flow = uploading(1);
    flow.on_resume(1, SHA, 0);
    let _ = transmits(&mut flow, 1);
    flow.on_ack(2, SHA, CHUNK_BYTES);
    assert_eq!(flow.poll_timeout(), Some(2 + BLOB_STALL_TIMEOUT_MS), "the controller's commit may have failed unsaid");
    flow.handle_timeout(2 + BLOB_STALL_TIMEOUT_MS);
    assert_eq!(
        transmits(&mut flow, 2 + BLOB_STALL_TIMEOUT_MS),
        [Transmit::Offer { sha256: SHA, size_bytes: CHUNK_BYTES }]
    );
}

#[test]
fn an_upload_held_back_by_the_connections_window_is_not_taken_for_stalled() {
    let size = 20 * CHUNK_BYTES;
    let mut flow = Flow::new();
    flow.link_up(0);
    flow.upload(0, ATT, &SHAS.map(|s| (s, size)));
    let _ = transmits(&mut flow, 0);
    for sha in SHAS {
        flow.on_resume(1, sha, 0);
    }
    let sent = transmits(&mut flow, 1);
    assert_eq!(chunks_of(&sent, SHAS[2]), 0, "the first two fill the window");
    // The first two are acknowledged along the way; the third has sent nothing to be answered.
    let half = BLOB_WINDOW_BYTES / 2;
    flow.on_ack(BLOB_STALL_TIMEOUT_MS, SHAS[0], half);
    flow.on_ack(BLOB_STALL_TIMEOUT_MS, SHAS[1], half);
    flow.handle_timeout(1 + BLOB_STALL_TIMEOUT_MS);
    let next = transmits(&mut flow, 1 + BLOB_STALL_TIMEOUT_MS);
    assert!(!next.iter().any(|t| matches!(t, Transmit::Offer { .. })), "nothing is offered again: {next:?}");
}
