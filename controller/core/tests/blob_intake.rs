//! The controller's blob intake (uploads from agents, downloads served) as a state machine, through its public API.

use cosmos_controller_core::blobs::machine::*;
use cosmos_proto::{ControllerBlob, Sha256};

const SHA: Sha256 = Sha256([4; 32]);

#[test]
fn an_offer_resumes_at_the_partial_files_end() {
    let mut intake = Intake::new();
    assert_eq!(
        intake.on_offer(SHA, 10, None, 4),
        OfferAction::Reply(ControllerBlob::Resume { sha256: SHA, have_bytes: 4 })
    );
    assert_eq!(intake.on_chunk(SHA, 4, 3, true), ChunkAction::Append);
    assert_eq!(intake.on_appended(SHA, 7, 7), Appended::Reply(ControllerBlob::Ack { sha256: SHA, have_bytes: 7 }));
    assert_eq!(intake.on_chunk(SHA, 7, 3, true), ChunkAction::Append);
    assert_eq!(intake.on_appended(SHA, 10, 10), Appended::Commit);
    assert_eq!(intake.on_committed(SHA, Ok(())), ControllerBlob::Stored { sha256: SHA });
}

#[test]
fn a_stored_blob_is_stored_and_an_overlong_partial_starts_over() {
    let mut intake = Intake::new();
    assert_eq!(intake.on_offer(SHA, 10, Some(10), 0), OfferAction::Reply(ControllerBlob::Stored { sha256: SHA }));
    let resume = ControllerBlob::Resume { sha256: SHA, have_bytes: 0 };
    assert_eq!(intake.on_offer(SHA, 10, None, 12), OfferAction::DiscardThenReply(resume));
}

#[test]
fn a_duplicate_or_out_of_order_chunk_is_never_appended() {
    let mut intake = Intake::new();
    intake.on_offer(SHA, 10, None, 0);
    assert_eq!(intake.on_chunk(SHA, 0, 4, true), ChunkAction::Append);
    intake.on_appended(SHA, 4, 4);
    assert_eq!(intake.on_chunk(SHA, 0, 4, true), ChunkAction::Ignore, "the same bytes twice");
    assert_eq!(intake.on_chunk(SHA, 8, 2, true), ChunkAction::Ignore, "past a gap");
    assert_eq!(intake.on_chunk(SHA, 4, 4, true), ChunkAction::Append);
}

#[test]
fn a_corrupt_chunk_asks_for_a_resend_from_the_good_bytes() {
    let mut intake = Intake::new();
    intake.on_offer(SHA, 10, None, 3);
    assert_eq!(
        intake.on_chunk(SHA, 3, 4, false),
        ChunkAction::Reply(ControllerBlob::Resume { sha256: SHA, have_bytes: 3 })
    );
}

#[test]
fn chunks_past_the_size_or_of_an_unoffered_blob_are_refused() {
    let mut intake = Intake::new();
    assert!(matches!(
        intake.on_chunk(SHA, 0, 4, true),
        ChunkAction::Reply(ControllerBlob::Refused { retry: cosmos_proto::Retry::Retryable, .. })
    ));
    intake.on_offer(SHA, 10, None, 0);
    assert!(matches!(
        intake.on_chunk(SHA, 8, 4, true),
        ChunkAction::Reply(ControllerBlob::Refused { retry: cosmos_proto::Retry::Terminal, .. })
    ));
}

#[test]
fn a_complete_partial_is_committed_at_the_offer_and_a_bad_one_starts_over() {
    let mut intake = Intake::new();
    assert_eq!(intake.on_offer(SHA, 10, None, 10), OfferAction::Commit);
    assert_eq!(intake.on_offer(SHA, 10, None, 10), OfferAction::Wait, "the commit under way answers");
    assert_eq!(intake.on_chunk(SHA, 0, 10, true), ChunkAction::Ignore);
    assert!(intake.commit_on_offer(&SHA));
    let failed = intake.on_committed(SHA, Err(("digest mismatch".into(), cosmos_proto::Retry::Terminal)));
    assert_eq!(failed, ControllerBlob::Resume { sha256: SHA, have_bytes: 0 });
    assert_eq!(intake.on_chunk(SHA, 0, 10, true), ChunkAction::Append);
}

#[test]
fn a_failed_commit_of_the_last_chunk_is_a_refusal() {
    let mut intake = Intake::new();
    intake.on_offer(SHA, 4, None, 0);
    intake.on_chunk(SHA, 0, 4, true);
    assert_eq!(intake.on_appended(SHA, 4, 4), Appended::Commit);
    let refused = intake.on_committed(SHA, Err(("digest mismatch".into(), cosmos_proto::Retry::Terminal)));
    assert!(matches!(refused, ControllerBlob::Refused { retry: cosmos_proto::Retry::Terminal, .. }));
}

#[test]
fn requests_are_served_only_from_a_stored_blob_and_within_it() {
    assert!(matches!(serve(SHA, 0, 10, None), Serve::Reply(ControllerBlob::Missing { .. })));
    assert_eq!(serve(SHA, 0, 10, Some(4)), Serve::Read { offset: 0, len_bytes: 4 });
    assert!(matches!(serve(SHA, 4, 10, Some(4)), Serve::Reply(ControllerBlob::Missing { .. })));
    // Asking for nothing at the end is answered with nothing: how an empty blob is fetched.
    assert_eq!(serve(SHA, 4, 0, Some(4)), Serve::Read { offset: 4, len_bytes: 0 });
    assert_eq!(serve(SHA, 0, 0, Some(0)), Serve::Read { offset: 0, len_bytes: 0 });
}

#[test]
fn an_upload_is_known_at_its_announced_size_until_it_is_stored() {
    let mut intake = Intake::new();
    assert_eq!(intake.size_bytes(&SHA), None);
    intake.on_offer(SHA, 10, None, 0);
    assert_eq!(intake.size_bytes(&SHA), Some(10));
    assert_eq!(intake.on_chunk(SHA, 0, 10, true), ChunkAction::Append);
    assert_eq!(intake.on_appended(SHA, 10, 10), Appended::Commit);
    assert_eq!(intake.on_committed(SHA, Ok(())), ControllerBlob::Stored { sha256: SHA });
    assert_eq!(intake.size_bytes(&SHA), None, "stored: no upload any more");
}

#[test]
fn a_full_table_forgets_the_upload_least_recently_sent_to_not_one_that_just_got_a_chunk() {
    // Repeated: HashMap order differs from one table to the next, and a tie between two
    // uploads would be broken by it.
    for _ in 0..20 {
        let mut intake = Intake::new();
        let sha = |i: usize| {
            let mut digest = [7u8; 32];
            digest[..8].copy_from_slice(&(i as u64).to_le_bytes());
            Sha256(digest)
        };
        for i in 0..UPLOADS_MAX {
            intake.on_offer(sha(i), 10, None, 0);
        }
        // The first one offered is sent a chunk after the last one was offered.
        assert_eq!(intake.on_chunk(sha(0), 0, 1, true), ChunkAction::Append);
        // Each new offer forgets one: the others offered before go first, then the last one offered.
        for n in 0..UPLOADS_MAX - 1 {
            intake.on_offer(sha(UPLOADS_MAX + n), 10, None, 0);
        }
        assert_eq!(intake.size_bytes(&sha(UPLOADS_MAX - 1)), None, "the last offered, sent nothing since, went");
        assert_eq!(intake.size_bytes(&sha(0)), Some(10), "the one that got a chunk stays");
    }
}

#[test]
fn a_full_table_forgets_the_upload_least_recently_offered() {
    // Repeated: HashMap order differs from one table to the next, and a tie would be broken by it.
    for _ in 0..20 {
        let mut intake = Intake::new();
        let sha = |i: usize| {
            let mut digest = [9u8; 32];
            digest[..8].copy_from_slice(&(i as u64).to_le_bytes());
            Sha256(digest)
        };
        for i in 0..UPLOADS_MAX {
            intake.on_offer(sha(i), 10, None, 0);
        }
        // The first one is offered again (the agent retried it): the second is now the stalest.
        intake.on_offer(sha(0), 10, None, 0);
        intake.on_offer(sha(UPLOADS_MAX), 10, None, 0);
        assert_eq!(intake.size_bytes(&sha(1)), None, "the least recently offered went");
        assert_eq!(intake.size_bytes(&sha(0)), Some(10), "the one offered again stays");
        assert_eq!(intake.size_bytes(&sha(UPLOADS_MAX)), Some(10));
    }
}

#[test]
fn a_read_near_the_end_is_cut_to_the_bytes_left() {
    assert_eq!(serve(SHA, 90, 64, Some(100)), Serve::Read { offset: 90, len_bytes: 10 });
    assert_eq!(serve(SHA, 99, 64, Some(100)), Serve::Read { offset: 99, len_bytes: 1 });
    assert_eq!(serve(SHA, 10, 64, Some(100)), Serve::Read { offset: 10, len_bytes: 64 });
}

#[test]
fn only_a_commit_begun_at_an_offer_counts_as_one() {
    let mut intake = Intake::new();
    assert!(!intake.commit_on_offer(&SHA), "an unknown upload");
    // Delivered chunk by chunk: its commit began at the last chunk, not at an offer.
    intake.on_offer(SHA, 4, None, 0);
    assert!(!intake.commit_on_offer(&SHA), "not committing yet");
    intake.on_chunk(SHA, 0, 4, true);
    assert_eq!(intake.on_appended(SHA, 4, 4), Appended::Commit);
    assert!(!intake.commit_on_offer(&SHA), "committing, but from its chunks");
    // Offered with every byte already in the partial file: the commit begins at the offer.
    let other = Sha256([5; 32]);
    assert_eq!(intake.on_offer(other, 4, None, 4), OfferAction::Commit);
    assert!(intake.commit_on_offer(&other));
}
