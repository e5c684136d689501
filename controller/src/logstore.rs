//! Attempt logs in shared segment files.
//!
//! A file per attempt and stream cost the controller a third of its CPU at a
//! thousand agents (creating an inode in one directory, under its lock, on
//! every short job) and left millions of files in one directory over a
//! retention period. Here every connection's log chunks are appended to the
//! one active segment, `logs/seg-N.log`, and described by fixed-size records
//! in its index, `logs/seg-N.idx`; the index of every segment is read back at
//! start-up, so a log reads the same after a restart. Pruning writes a
//! tombstone for each forgotten log and deletes a segment once nothing in it
//! is referenced. Logs written by earlier versions, one file per stream
//! (`logs/att-N.stdout`), are still read and pruned.
//!
//! Not fsynced, as the per-attempt files were not: a log is a job's
//! diagnostic, and its outcome is in the store. A torn tail after a crash is
//! dropped when the index is read: a record whose bytes are not all in the
//! segment is not used.

use cosmos_proto::{AttemptId, LogChunk, LogStream};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A segment is closed and a new one started once it holds this much.
pub const SEGMENT_BYTES_MAX: u64 = 64 << 20;
/// Bytes of one index record.
const RECORD_BYTES: usize = 32;
/// A record's `len` that marks a tombstone: the log is forgotten.
const TOMBSTONE_LEN: u32 = u32::MAX;
/// Largest piece one record describes; a longer chunk (never sent: chunks are far smaller) is split.
const PIECE_BYTES_MAX: u64 = (u32::MAX - 1) as u64;

/// What is written at the cut of a log that reached its bound.
pub fn log_cut_marker(bytes_max: u64) -> String {
    format!(
        "\n[cosmos: this log was cut at {bytes_max} bytes; the rest was dropped (controller --attempt-log-bytes-max)]\n"
    )
}

/// A log: an attempt's stdout or stderr.
type Key = (AttemptId, LogStream);

/// Bytes of a log at `log_offset`, stored in segment `segment` at `seg_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    log_offset: u64,
    seg_offset: u64,
    len: u32,
    segment: u32,
}

impl Piece {
    fn end(&self) -> u64 {
        self.log_offset + u64::from(self.len)
    }
}

/// The pieces of one log, by log offset, not overlapping.
#[derive(Debug, Default)]
struct Entry {
    pieces: Vec<Piece>,
}

impl Entry {
    /// The log's length: the end of its last byte.
    fn len(&self) -> u64 {
        self.pieces.last().map_or(0, Piece::end)
    }
}

/// The segment being appended to.
struct Active {
    number: u32,
    data: File,
    index: File,
    data_bytes: u64,
}

struct Inner {
    entries: HashMap<Key, Entry>,
    /// The segments on disk.
    segments: BTreeSet<u32>,
    /// Pieces each segment still holds for a live log.
    live_pieces: BTreeMap<u32, u64>,
    /// The older segments whose pieces each segment's tombstones cancel: while one of them is
    /// on disk, so must the tombstones be, or a restart would bring the pieces back.
    tomb_refs: BTreeMap<u32, BTreeSet<u32>>,
    /// Opened at the first append after start-up: a restart never appends to a segment that may be torn.
    active: Option<Active>,
    next_segment: u32,
}

/// What [`LogStore::open`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Segments kept.
    pub segments: usize,
    /// Logs (attempt streams) they hold.
    pub logs: usize,
    /// Index records not used: torn by a crash, or past their segment's end.
    pub torn_records: usize,
}

/// What [`LogStore::forget`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forgotten {
    /// Logs (attempt streams) removed.
    pub logs: usize,
    /// Bytes they held.
    pub bytes: u64,
    /// Segments deleted because nothing in them was referenced any more.
    pub segments: usize,
}

/// The controller's attempt logs: appended by the agent connections, read by the API.
pub struct LogStore {
    dir: PathBuf,
    log_bytes_max: u64,
    segment_bytes_max: u64,
    inner: Mutex<Inner>,
}

fn segment_path(dir: &Path, number: u32, ext: &str) -> PathBuf {
    dir.join(format!("seg-{number:08}.{ext}"))
}

/// A log file of the layout before segments: one file per attempt and stream.
fn legacy_path(dir: &Path, (attempt, stream): Key) -> PathBuf {
    let ext = if stream == LogStream::Stdout { "stdout" } else { "stderr" };
    dir.join(format!("{attempt}.{ext}"))
}

fn stream_byte(stream: LogStream) -> u8 {
    match stream {
        LogStream::Stdout => 0,
        LogStream::Stderr => 1,
    }
}

fn encode_record(out: &mut Vec<u8>, (attempt, stream): Key, log_offset: u64, seg_offset: u64, len: u32) {
    out.extend_from_slice(&attempt.0.to_le_bytes());
    out.extend_from_slice(&log_offset.to_le_bytes());
    out.extend_from_slice(&seg_offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[stream_byte(stream), 0, 0, 0]);
}

/// A record's fields, or `None` for a stream byte no version writes.
fn decode_record(r: &[u8]) -> Option<(Key, u64, u64, u32)> {
    let u64_at = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().expect("8 bytes"));
    let stream = match r[28] {
        0 => LogStream::Stdout,
        1 => LogStream::Stderr,
        _ => return None,
    };
    let len = u32::from_le_bytes(r[24..28].try_into().expect("4 bytes"));
    Some(((AttemptId(u64_at(0)), stream), u64_at(8), u64_at(16), len))
}

/// The bytes a chunk adds to a log that is `known` long and ends at `log_bytes_max`:
/// (offset, data), and whether the cut marker follows them. Bytes already held are skipped
/// (a chunk resent after a reconnect is stored once).
fn new_bytes(known: u64, chunk: &LogChunk, log_bytes_max: u64) -> Option<(u64, &[u8], bool)> {
    if chunk.offset > log_bytes_max {
        return None;
    }
    let room = usize::try_from(log_bytes_max - chunk.offset).unwrap_or(usize::MAX);
    let data = &chunk.data[..chunk.data.len().min(room)];
    let cut = data.len() < chunk.data.len() && known <= log_bytes_max;
    let skip = usize::try_from(known.saturating_sub(chunk.offset)).unwrap_or(usize::MAX).min(data.len());
    let data = &data[skip..];
    if data.is_empty() && !cut {
        return None;
    }
    Some((chunk.offset + skip as u64, data, cut))
}

impl LogStore {
    /// Opens the logs in `dir` (created by the caller), reading every segment's index.
    /// Each stored log is bounded at `log_bytes_max`, past which a cut marker is stored once.
    pub fn open(dir: &Path, log_bytes_max: u64, segment_bytes_max: u64) -> std::io::Result<(LogStore, Loaded)> {
        let mut numbers: Vec<u32> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                name.strip_prefix("seg-")?.strip_suffix(".idx")?.parse().ok()
            })
            .collect();
        numbers.sort_unstable();
        let mut inner = Inner {
            entries: HashMap::new(),
            segments: numbers.iter().copied().collect(),
            live_pieces: BTreeMap::new(),
            tomb_refs: BTreeMap::new(),
            active: None,
            next_segment: numbers.last().map_or(1, |n| n + 1),
        };
        let mut loaded = Loaded::default();
        for &number in &numbers {
            let index = std::fs::read(segment_path(dir, number, "idx"))?;
            let data_bytes = std::fs::metadata(segment_path(dir, number, "log")).map_or(0, |m| m.len());
            loaded.torn_records += usize::from(index.len() % RECORD_BYTES != 0);
            for r in index.chunks_exact(RECORD_BYTES) {
                let Some((key, log_offset, seg_offset, len)) = decode_record(r) else {
                    loaded.torn_records += 1;
                    continue;
                };
                if len == TOMBSTONE_LEN {
                    inner.remove(key, number);
                    continue;
                }
                if seg_offset.saturating_add(u64::from(len)) > data_bytes {
                    loaded.torn_records += 1;
                    continue;
                }
                inner.insert(key, Piece { log_offset, seg_offset, len, segment: number });
            }
        }
        for number in inner.dead(None) {
            remove_segment(dir, number);
        }
        loaded.segments = inner.segments.len();
        loaded.logs = inner.entries.len();
        let store = LogStore { dir: dir.to_path_buf(), log_bytes_max, segment_bytes_max, inner: Mutex::new(inner) };
        Ok((store, loaded))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a batch of chunks: one write to the active segment and one to its index.
    pub fn append(&self, chunks: &[LogChunk]) -> std::io::Result<()> {
        // Chunks of one log side by side in the segment: they merge into one piece.
        let mut order: Vec<&LogChunk> = chunks.iter().collect();
        order.sort_by_key(|c| (c.attempt_id, stream_byte(c.stream), c.offset));
        let mut inner = self.lock();
        let needs_new = inner.active.as_ref().is_none_or(|a| a.data_bytes >= self.segment_bytes_max);
        if needs_new {
            inner.open_segment(&self.dir)?;
        }
        let Inner { entries, live_pieces, active: slot, .. } = &mut *inner;
        let active = slot.as_mut().expect("opened above");
        let (mut data, mut index) = (Vec::new(), Vec::new());
        let mut pieces: Vec<(Key, Piece)> = Vec::new();
        let marker = log_cut_marker(self.log_bytes_max);
        for chunk in order {
            let key = (chunk.attempt_id, chunk.stream);
            // What this batch already added to the log counts as held.
            let known = pieces
                .iter()
                .rev()
                .find(|(k, _)| *k == key)
                .map(|(_, p)| p.end())
                .or_else(|| entries.get(&key).map(Entry::len))
                .unwrap_or(0);
            let Some((offset, bytes, cut)) = new_bytes(known, chunk, self.log_bytes_max) else { continue };
            let mut add = |log_offset: u64, bytes: &[u8]| {
                for (i, part) in bytes.chunks(PIECE_BYTES_MAX as usize).enumerate() {
                    let piece = Piece {
                        log_offset: log_offset + (i as u64) * PIECE_BYTES_MAX,
                        seg_offset: active.data_bytes + data.len() as u64,
                        len: part.len() as u32,
                        segment: active.number,
                    };
                    data.extend_from_slice(part);
                    encode_record(&mut index, key, piece.log_offset, piece.seg_offset, piece.len);
                    pieces.push((key, piece));
                }
            };
            if !bytes.is_empty() {
                add(offset, bytes);
            }
            if cut {
                add(self.log_bytes_max, marker.as_bytes());
            }
        }
        if data.is_empty() {
            return Ok(());
        }
        // Data before its index: an index record never names bytes not yet written.
        let written = active.data.write_all(&data).and_then(|()| active.index.write_all(&index));
        if let Err(e) = written {
            // Where the segment's data or index now ends is unknown: the next append starts another.
            *slot = None;
            return Err(e);
        }
        active.data_bytes += data.len() as u64;
        for (key, piece) in pieces {
            insert(entries, live_pieces, key, piece);
        }
        Ok(())
    }

    /// How long a log is; `None` when nothing of it is stored.
    pub fn len(&self, attempt: AttemptId, stream: LogStream) -> Option<u64> {
        if let Some(e) = self.lock().entries.get(&(attempt, stream)) {
            return Some(e.len());
        }
        std::fs::metadata(legacy_path(&self.dir, (attempt, stream))).ok().map(|m| m.len())
    }

    /// Up to `max` bytes of a log from `from` (fewer at its end); a gap the agent never filled reads as zeros.
    pub fn read_at(&self, attempt: AttemptId, stream: LogStream, from: u64, max: u64) -> std::io::Result<Vec<u8>> {
        let key = (attempt, stream);
        let (pieces, len) = {
            let inner = self.lock();
            match inner.entries.get(&key) {
                None => {
                    drop(inner);
                    return read_legacy(&legacy_path(&self.dir, key), from, max);
                }
                Some(e) => {
                    let to = e.len().min(from.saturating_add(max));
                    let first = e.pieces.partition_point(|p| p.end() <= from);
                    let wanted: Vec<Piece> =
                        e.pieces[first..].iter().take_while(|p| p.log_offset < to).copied().collect();
                    (wanted, to)
                }
            }
        };
        if len <= from {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (len - from) as usize];
        let mut files: HashMap<u32, File> = HashMap::new();
        for p in pieces {
            let start = p.log_offset.max(from);
            let end = p.end().min(len);
            if end <= start {
                continue;
            }
            let file = match files.entry(p.segment) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(File::open(segment_path(&self.dir, p.segment, "log"))?)
                }
            };
            let dst = &mut out[(start - from) as usize..(end - from) as usize];
            file.read_exact_at(dst, p.seg_offset + (start - p.log_offset))?;
        }
        Ok(out)
    }

    /// Forgets the logs of these attempts (pruned with their jobs): tombstones in the active
    /// index, then segments nothing references any more are deleted, with files of the old layout.
    pub fn forget(&self, attempts: &[AttemptId]) -> std::io::Result<Forgotten> {
        let mut gone = Forgotten::default();
        let keys: Vec<Key> = attempts.iter().flat_map(|&a| [(a, LogStream::Stdout), (a, LogStream::Stderr)]).collect();
        // Files of the old layout first, without the lock: a large prune's file calls never hold up appends.
        for &key in &keys {
            let legacy = legacy_path(&self.dir, key);
            if let Ok(m) = std::fs::metadata(&legacy) {
                if std::fs::remove_file(&legacy).is_ok() {
                    gone.logs += 1;
                    gone.bytes += m.len();
                }
            }
        }
        let mut tombstones = Vec::new();
        let mut inner = self.lock();
        for key in keys {
            if let Some(e) = inner.entries.get(&key) {
                gone.logs += 1;
                gone.bytes += e.pieces.iter().map(|p| u64::from(p.len)).sum::<u64>();
                encode_record(&mut tombstones, key, 0, 0, TOMBSTONE_LEN);
            }
        }
        if tombstones.is_empty() {
            return Ok(gone);
        }
        // The tombstones go where a restart reads them after the pieces they cancel.
        if inner.active.is_none() {
            inner.open_segment(&self.dir)?;
        }
        let active = inner.active.as_mut().expect("opened above");
        if let Err(e) = active.index.write_all(&tombstones) {
            // A record cut short would shift every later one: the next write starts another segment.
            inner.active = None;
            return Err(e);
        }
        let active = active.number;
        for r in tombstones.chunks_exact(RECORD_BYTES) {
            let (key, ..) = decode_record(r).expect("encoded above");
            inner.remove(key, active);
        }
        for number in inner.dead(Some(active)) {
            remove_segment(&self.dir, number);
            gone.segments += 1;
        }
        Ok(gone)
    }
}

fn insert(entries: &mut HashMap<Key, Entry>, live: &mut BTreeMap<u32, u64>, key: Key, piece: Piece) {
    let entry = entries.entry(key).or_default();
    // Pieces are appended in log order; one that continues the last in the same segment extends it.
    if let Some(last) = entry.pieces.last_mut() {
        if piece.log_offset < last.end() {
            return; // Bytes already held (an index read back after a resend was stored twice).
        }
        if last.segment == piece.segment
            && last.end() == piece.log_offset
            && last.seg_offset + u64::from(last.len) == piece.seg_offset
            && u64::from(last.len) + u64::from(piece.len) <= PIECE_BYTES_MAX
        {
            last.len += piece.len;
            return;
        }
    }
    entry.pieces.push(piece);
    *live.entry(piece.segment).or_insert(0) += 1;
}

impl Inner {
    /// Starts the next segment; the one before it is never appended to again.
    fn open_segment(&mut self, dir: &Path) -> std::io::Result<()> {
        let number = self.next_segment;
        let open = |ext| {
            std::fs::OpenOptions::new().create_new(true).append(true).mode(0o600).open(segment_path(dir, number, ext))
        };
        self.active = Some(Active { number, data: open("log")?, index: open("idx")?, data_bytes: 0 });
        self.segments.insert(number);
        self.next_segment += 1;
        Ok(())
    }

    fn insert(&mut self, key: Key, piece: Piece) {
        insert(&mut self.entries, &mut self.live_pieces, key, piece);
    }

    /// Forgets a log, by a tombstone in segment `tombstone_in`.
    fn remove(&mut self, key: Key, tombstone_in: u32) {
        if let Some(e) = self.entries.remove(&key) {
            for p in e.pieces {
                if let Some(count) = self.live_pieces.get_mut(&p.segment) {
                    *count = count.saturating_sub(1);
                }
                if p.segment != tombstone_in {
                    self.tomb_refs.entry(tombstone_in).or_default().insert(p.segment);
                }
            }
        }
    }

    /// Takes out of the books, oldest first, the segments that may go: not `active`, no live
    /// piece, and no tombstone that still cancels a piece in a segment on disk.
    fn dead(&mut self, active: Option<u32>) -> Vec<u32> {
        let mut dead = Vec::new();
        let numbers: Vec<u32> = self.segments.iter().copied().collect();
        for n in numbers {
            let live = self.live_pieces.get(&n).copied().unwrap_or(0) > 0;
            let needed = self.tomb_refs.get(&n).is_some_and(|refs| refs.iter().any(|r| self.segments.contains(r)));
            if Some(n) != active && !live && !needed {
                self.segments.remove(&n);
                self.live_pieces.remove(&n);
                self.tomb_refs.remove(&n);
                dead.push(n);
            }
        }
        dead
    }
}

fn remove_segment(dir: &Path, number: u32) {
    for ext in ["log", "idx"] {
        let path = segment_path(dir, number, ext);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a log segment nothing references");
            }
        }
    }
}

fn read_legacy(path: &Path, from: u64, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek};
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    file.seek(std::io::SeekFrom::Start(from))?;
    let mut out = Vec::new();
    file.take(max).read_to_end(&mut out)?;
    Ok(out)
}
