//! The attempt log store against a real directory: what is appended reads back
//! the same, before and after a reopen; resends are stored once; the bound is
//! kept and marked; pruned logs stay gone and free their segments; a torn
//! tail is dropped; logs of the one-file-per-stream layout still read.

use cosmos_controller::logstore::log_cut_marker;
use cosmos_controller::logstore::{Loaded, LogStore};
use cosmos_proto::{AttemptId, LogChunk, LogStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const BIG: u64 = 1 << 30;

fn chunk(attempt: u64, stream: LogStream, offset: u64, data: &[u8]) -> LogChunk {
    LogChunk { attempt_id: AttemptId(attempt), stream, offset, data: data.to_vec() }
}

fn all(store: &LogStore, attempt: u64, stream: LogStream) -> Vec<u8> {
    let len = store.len(AttemptId(attempt), stream).expect("the log exists");
    store.read_at(AttemptId(attempt), stream, 0, len + 10).unwrap()
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

#[test]
fn interleaved_logs_read_back_whole_across_segments_and_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments: the logs below span several.
    let (store, _) = LogStore::open(dir.path(), BIG, 4096).unwrap();
    let mut expected: Vec<Vec<u8>> = vec![Vec::new(); 6];
    for round in 0..40u64 {
        let mut batch = Vec::new();
        for a in 0..3u64 {
            for (s, stream) in [LogStream::Stdout, LogStream::Stderr].into_iter().enumerate() {
                let text = format!("attempt {a} stream {s} line {round}\n").repeat((round % 5 + 1) as usize);
                let exp = &mut expected[(a * 2) as usize + s];
                batch.push(chunk(a, stream, exp.len() as u64, text.as_bytes()));
                exp.extend_from_slice(text.as_bytes());
            }
        }
        store.append(&batch).unwrap();
    }
    let check = |store: &LogStore| {
        for a in 0..3u64 {
            for (s, stream) in [LogStream::Stdout, LogStream::Stderr].into_iter().enumerate() {
                let exp = &expected[(a * 2) as usize + s];
                assert_eq!(all(store, a, stream), *exp, "attempt {a} stream {s}");
                // A read from the middle, across pieces.
                let mid = store.read_at(AttemptId(a), stream, 100, 1000).unwrap();
                assert_eq!(mid, exp[100..1100.min(exp.len())], "attempt {a} stream {s} from 100");
            }
        }
    };
    check(&store);
    let segments = segment_files(dir.path()).iter().filter(|n| n.ends_with(".log")).count();
    assert!(segments > 3, "4 KiB segments roll over: {segments}");
    drop(store);
    let (store, loaded) = LogStore::open(dir.path(), BIG, 4096).unwrap();
    assert_eq!(loaded, Loaded { segments, logs: 6, torn_records: 0 });
    check(&store);
    // Appends after a reopen go to a new segment and read with the rest.
    store.append(&[chunk(0, LogStream::Stdout, expected[0].len() as u64, b"after the restart\n")]).unwrap();
    assert!(all(&store, 0, LogStream::Stdout).ends_with(b"line 39\nafter the restart\n"));
    assert_eq!(store.len(AttemptId(99), LogStream::Stdout), None, "a log never written does not exist");
}

#[test]
fn a_resent_chunk_is_stored_once_and_an_overlap_adds_only_its_new_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = LogStore::open(dir.path(), BIG, 1 << 20).unwrap();
    store.append(&[chunk(1, LogStream::Stdout, 0, b"hello "), chunk(1, LogStream::Stdout, 6, b"world\n")]).unwrap();
    // After a reconnect the agent resends from an earlier offset, the same bytes and then more.
    store
        .append(&[chunk(1, LogStream::Stdout, 6, b"world\n"), chunk(1, LogStream::Stdout, 0, b"hello world\nagain\n")])
        .unwrap();
    assert_eq!(all(&store, 1, LogStream::Stdout), b"hello world\nagain\n");
    drop(store);
    let (store, _) = LogStore::open(dir.path(), BIG, 1 << 20).unwrap();
    assert_eq!(all(&store, 1, LogStream::Stdout), b"hello world\nagain\n");
    // A chunk past the end (one lost in between) leaves a gap of zeros, as a file written at its offset did.
    store.append(&[chunk(1, LogStream::Stdout, 20, b"late\n")]).unwrap();
    assert_eq!(all(&store, 1, LogStream::Stdout), b"hello world\nagain\n\0\0late\n");
}

#[test]
fn a_log_is_cut_at_its_bound_and_the_cut_marked_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = LogStore::open(dir.path(), 10, 1 << 20).unwrap();
    store.append(&[chunk(2, LogStream::Stderr, 0, b"0123456"), chunk(2, LogStream::Stderr, 7, b"789abcdef")]).unwrap();
    let cut = format!("0123456789{}", log_cut_marker(10));
    assert_eq!(all(&store, 2, LogStream::Stderr), cut.as_bytes());
    // The agent goes on sending, and resends the chunk that crossed the bound: nothing changes.
    store.append(&[chunk(2, LogStream::Stderr, 16, b"more"), chunk(2, LogStream::Stderr, 7, b"789abcdef")]).unwrap();
    assert_eq!(all(&store, 2, LogStream::Stderr), cut.as_bytes());
    // A chunk that ends exactly at the bound is whole; the next one is cut (with nothing of it kept).
    store.append(&[chunk(3, LogStream::Stdout, 0, b"0123456789")]).unwrap();
    assert_eq!(all(&store, 3, LogStream::Stdout), b"0123456789");
    store.append(&[chunk(3, LogStream::Stdout, 10, b"x")]).unwrap();
    assert_eq!(all(&store, 3, LogStream::Stdout), format!("0123456789{}", log_cut_marker(10)).as_bytes());
}

#[test]
fn forgotten_logs_stay_gone_after_a_reopen_and_free_their_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = LogStore::open(dir.path(), BIG, 64).unwrap();
    // Attempts 1 and 2 fill the first segments; attempt 3 shares the last one with attempt 2.
    store.append(&[chunk(1, LogStream::Stdout, 0, &[b'a'; 100])]).unwrap();
    store.append(&[chunk(2, LogStream::Stdout, 0, &[b'b'; 100]), chunk(2, LogStream::Stderr, 0, b"oops\n")]).unwrap();
    store.append(&[chunk(3, LogStream::Stdout, 0, b"kept\n")]).unwrap();
    let before = segment_files(dir.path());
    assert_eq!(before.len(), 6, "three segments, each a log and an index: {before:?}");
    let gone = store.forget(&[AttemptId(1), AttemptId(2)]).unwrap();
    assert_eq!((gone.logs, gone.bytes, gone.segments), (3, 205, 2), "{gone:?}");
    assert_eq!(store.len(AttemptId(1), LogStream::Stdout), None);
    assert_eq!(store.len(AttemptId(2), LogStream::Stderr), None);
    assert_eq!(segment_files(dir.path()), before[4..], "only the segment attempt 3 is in (the active one) is left");
    assert_eq!(store.forget(&[AttemptId(1)]).unwrap().logs, 0, "forgetting twice removes nothing more");
    drop(store);
    let (store, loaded) = LogStore::open(dir.path(), BIG, 64).unwrap();
    assert_eq!((loaded.logs, loaded.segments), (1, 1), "{loaded:?}");
    assert_eq!(store.len(AttemptId(2), LogStream::Stdout), None, "the tombstone outlives the restart");
    assert_eq!(all(&store, 3, LogStream::Stdout), b"kept\n");
    // Once its last log is forgotten, the next reopen removes the segment too.
    store.forget(&[AttemptId(3)]).unwrap();
    drop(store);
    let (_, loaded) = LogStore::open(dir.path(), BIG, 64).unwrap();
    assert_eq!(loaded, Loaded { segments: 0, logs: 0, torn_records: 0 });
    let left = segment_files(dir.path());
    assert!(left.len() <= 2, "at most the segment that holds the last tombstones: {left:?}");
}

#[test]
fn a_torn_tail_after_a_crash_is_dropped_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = LogStore::open(dir.path(), BIG, 1 << 20).unwrap();
    store.append(&[chunk(1, LogStream::Stdout, 0, b"whole line\n")]).unwrap();
    store.append(&[chunk(1, LogStream::Stdout, 11, b"written as the power went\n")]).unwrap();
    drop(store);
    // The segment lost the last write's bytes; its index kept the record and half of another.
    let log = dir.path().join("seg-00000001.log");
    let idx = dir.path().join("seg-00000001.idx");
    std::fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(11).unwrap();
    let mut index = std::fs::read(&idx).unwrap();
    index.extend_from_slice(&[7; 13]);
    std::fs::write(&idx, index).unwrap();
    let (store, loaded) = LogStore::open(dir.path(), BIG, 1 << 20).unwrap();
    assert_eq!(loaded, Loaded { segments: 1, logs: 1, torn_records: 2 });
    assert_eq!(all(&store, 1, LogStream::Stdout), b"whole line\n");
    // The agent's resend fills it again, in a new segment.
    store.append(&[chunk(1, LogStream::Stdout, 11, b"written as the power went\n")]).unwrap();
    assert_eq!(all(&store, 1, LogStream::Stdout), b"whole line\nwritten as the power went\n");
}

#[test]
fn segments_are_private_and_logs_of_the_file_per_stream_layout_still_read_and_prune() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("att-7.stdout"), b"from an older controller\n").unwrap();
    let (store, loaded) = LogStore::open(dir.path(), BIG, 1 << 20).unwrap();
    assert_eq!(loaded, Loaded::default());
    assert_eq!(all(&store, 7, LogStream::Stdout), b"from an older controller\n");
    assert_eq!(store.read_at(AttemptId(7), LogStream::Stdout, 5, 5).unwrap(), b"an ol");
    store.append(&[chunk(8, LogStream::Stdout, 0, b"new\n")]).unwrap();
    for name in segment_files(dir.path()).iter().filter(|n| n.starts_with("seg-")) {
        let mode = std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{name} is readable by others: {mode:o}");
    }
    let gone = store.forget(&[AttemptId(7)]).unwrap();
    assert_eq!((gone.logs, gone.bytes), (1, 25));
    assert!(!dir.path().join("att-7.stdout").exists());
    assert_eq!(store.len(AttemptId(7), LogStream::Stdout), None);
}

#[test]
fn a_segment_with_tombstones_stays_while_the_pieces_they_cancel_are_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = LogStore::open(dir.path(), BIG, 64).unwrap();
    // Segment 1: attempts 1 and 2. Segment 2: attempt 3, then attempt 1's tombstone.
    store
        .append(&[chunk(1, LogStream::Stdout, 0, &[b'a'; 100]), chunk(2, LogStream::Stdout, 0, b"long-lived\n")])
        .unwrap();
    store.append(&[chunk(3, LogStream::Stdout, 0, &[b'c'; 100])]).unwrap();
    store.forget(&[AttemptId(1)]).unwrap();
    // Segment 3: attempt 4, then attempt 3's tombstone. Segment 2 holds no log now, but its
    // tombstone still cancels attempt 1 in segment 1, which attempt 2 keeps on disk.
    store.append(&[chunk(4, LogStream::Stdout, 0, b"four\n")]).unwrap();
    let gone = store.forget(&[AttemptId(3)]).unwrap();
    assert_eq!(gone.segments, 0, "segment 2's tombstone is still needed");
    drop(store);
    let (store, loaded) = LogStore::open(dir.path(), BIG, 64).unwrap();
    assert_eq!(store.len(AttemptId(1), LogStream::Stdout), None, "attempt 1 did not come back");
    assert_eq!(store.len(AttemptId(3), LogStream::Stdout), None);
    assert_eq!(all(&store, 2, LogStream::Stdout), b"long-lived\n");
    assert_eq!(loaded.logs, 2);
    // Once attempt 2 goes, segment 1 goes, and with it the need for segment 2.
    let gone = store.forget(&[AttemptId(2)]).unwrap();
    assert_eq!(gone.segments, 2, "{gone:?}");
    assert_eq!(all(&store, 4, LogStream::Stdout), b"four\n");
}
