//! Attempt logs on the controller: written as agents stream them, one writer
//! task per connection, each chunk at its offset; read back by the API.

use crate::shared::{DataDir, Shared};
use cosmos_proto::{AttemptId, LogStream};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Log files one batch of chunks keeps open at once; more are closed first. Files are
/// closed after each batch: an attempt never says its log is complete, so files kept
/// open between batches would pile up with finished attempts, and a thousand agents
/// each holding hundreds exhausted the controller's open-files limit (then refused the API).
const LOG_FILES_OPEN_MAX: usize = 16;
/// Log chunks of one connection queued for its log writer; a full queue slows the agent's reads.
pub(crate) const LOG_QUEUE_CHUNKS_MAX: usize = 64;
/// Log chunks written in one go on the blocking pool.
const LOG_BATCH_CHUNKS_MAX: usize = 64;

/// Writes one connection's log chunks, in batches on the blocking pool, until the connection ends.
pub(crate) async fn write_logs(mut rx: mpsc::Receiver<cosmos_proto::LogChunk>, shared: Arc<Shared>) {
    let mut batch = Vec::with_capacity(LOG_BATCH_CHUNKS_MAX);
    while rx.recv_many(&mut batch, LOG_BATCH_CHUNKS_MAX).await > 0 {
        let chunks = std::mem::take(&mut batch);
        let shared = shared.clone();
        let written = tokio::task::spawn_blocking(move || {
            // Open for this batch only (see LOG_FILES_OPEN_MAX): chunks of one attempt share an open.
            let mut files = LogFiles::default();
            for chunk in &chunks {
                files.append(&shared.dir, chunk, shared.attempt_log_bytes_max);
            }
        })
        .await;
        if let Err(e) = written {
            tracing::error!(error = %e, "the attempt log writer failed; this connection's logs stop here");
            return;
        }
    }
}

/// Open log files of one batch's attempts, appended at the chunk's offset
/// so a chunk resent after a reconnect is written once.
#[derive(Default)]
struct LogFiles {
    open: HashMap<(AttemptId, bool), std::fs::File>,
}

/// What is written at the cut of a log that reached its bound.
pub fn log_cut_marker(bytes_max: u64) -> String {
    format!(
        "\n[cosmos: this log was cut at {bytes_max} bytes; the rest was dropped (controller --attempt-log-bytes-max)]\n"
    )
}

impl LogFiles {
    /// Writes a chunk at its offset; bytes past `bytes_max` are dropped, and the cut marked once after it.
    fn append(&mut self, dir: &DataDir, chunk: &cosmos_proto::LogChunk, bytes_max: u64) {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        if chunk.offset > bytes_max {
            return;
        }
        let key = (chunk.attempt_id, chunk.stream == LogStream::Stdout);
        if !self.open.contains_key(&key) {
            match std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .mode(0o600)
                .open(dir.log_file(chunk.attempt_id, chunk.stream))
            {
                Ok(f) => {
                    if self.open.len() >= LOG_FILES_OPEN_MAX {
                        self.open.clear();
                    }
                    self.open.insert(key, f);
                }
                Err(e) => return tracing::warn!(error = %e, "cannot write attempt log"),
            }
        }
        let room = usize::try_from(bytes_max - chunk.offset).unwrap_or(usize::MAX);
        let data = &chunk.data[..chunk.data.len().min(room)];
        let file = &self.open[&key];
        let mut written = file.write_all_at(data, chunk.offset);
        if data.len() < chunk.data.len() {
            written = written.and_then(|()| file.write_all_at(log_cut_marker(bytes_max).as_bytes(), bytes_max));
        }
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot write attempt log");
        }
    }
}

/// Bytes of one log file read at a time: a reader's memory, whatever the log's size.
const LOG_READ_CHUNK_BYTES: u64 = 256 * 1024;

/// Where a log reader starts in each file.
#[derive(Clone, Copy)]
pub struct LogStart {
    /// Start this many bytes from the end (at the next line start).
    pub tail_bytes: Option<u64>,
    /// Start at this byte.
    pub offset: u64,
}

/// What a log reader does with the last line of a file when its newline has not come yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unended {
    /// Send it as a line: the job is final, the line will never end.
    Line,
    /// Send what is there as a `partial` event, the line going on in what
    /// follows: a reader that reads once (not following) sees all there is.
    Partial,
    /// Send it as `partial` once it was already waiting at the reader's
    /// previous read: a follower gets a progress bar's `\r` redraws within
    /// a poll or two, while a line written in two writes mostly stays whole.
    Hold,
}

/// Appends the lines of `path` after `*pos` (at most `LOG_READ_CHUNK_BYTES`
/// of them) to `out` as events, moving `*pos` past them. A last line without
/// its newline is treated as `unended` says; `*held` is where such a line
/// started when it was last held back (for [`Unended::Hold`]). A line longer
/// than a whole chunk goes as `partial` pieces. Returns whether more is
/// there to read at once.
pub fn read_log(
    path: &std::path::Path,
    pos: &mut Option<u64>,
    held: &mut Option<u64>,
    start: LogStart,
    unended: Unended,
    out: &mut String,
) -> bool {
    use std::io::{Read, Seek};
    let Ok(mut file) = std::fs::File::open(path) else { return false };
    let Ok(len) = file.metadata().map(|m| m.len()) else { return false };
    let from = match *pos {
        Some(p) => p,
        None => {
            let mut p = start.offset;
            if let Some(tail) = start.tail_bytes {
                p = p.max(len.saturating_sub(tail));
                // A tail starts at a line's beginning.
                if p > 0 && p < len {
                    let mut prev = [0u8; 1];
                    if file.seek(std::io::SeekFrom::Start(p - 1)).is_ok()
                        && file.read_exact(&mut prev).is_ok()
                        && prev[0] != b'\n'
                    {
                        let mut rest = Vec::new();
                        let _ = (&mut file).take(LOG_READ_CHUNK_BYTES).read_to_end(&mut rest);
                        match rest.iter().position(|&b| b == b'\n') {
                            Some(nl) => p += nl as u64 + 1,
                            None => p = len,
                        }
                    }
                }
            }
            p
        }
    };
    *pos = Some(from);
    if len <= from {
        return false;
    }
    let want = (len - from).min(LOG_READ_CHUNK_BYTES);
    let mut buf = Vec::with_capacity(want as usize);
    if file.seek(std::io::SeekFrom::Start(from)).is_err() || (&mut file).take(want).read_to_end(&mut buf).is_err() {
        return false;
    }
    let at_end = from + buf.len() as u64 == len;
    let whole = buf.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    for line in String::from_utf8_lossy(&buf[..whole]).lines() {
        push_event(out, None, line);
    }
    let mut upto = whole;
    let rest = &buf[whole..];
    if !rest.is_empty() {
        // The line goes on past this chunk, or its newline has not come yet.
        let how = if !at_end {
            (whole == 0).then_some(Unended::Partial)
        } else {
            match unended {
                Unended::Hold if *held == Some(from + whole as u64) => Some(Unended::Partial),
                Unended::Hold => {
                    *held = Some(from + whole as u64);
                    None
                }
                other => Some(other),
            }
        };
        match how {
            Some(Unended::Line) => {
                push_event(out, None, &String::from_utf8_lossy(rest));
                upto = buf.len();
            }
            Some(_) => {
                // A character cut by the chunk's end (or the writer's) goes with the rest of it.
                let complete = match std::str::from_utf8(rest) {
                    Err(e) if e.error_len().is_none() => e.valid_up_to(),
                    _ => rest.len(),
                };
                if complete > 0 {
                    push_event(out, Some("partial"), &String::from_utf8_lossy(&rest[..complete]));
                    upto += complete;
                    *held = None;
                }
            }
            None => {}
        }
    }
    *pos = Some(from + upto as u64);
    from + (upto as u64) < len && upto > 0
}

/// One server-sent event of log text: `data: TEXT`, under `event: KIND` when given.
/// The text holds no newline; a `\r` in it (a progress bar's redraw) is sent as it is.
fn push_event(out: &mut String, kind: Option<&str>, text: &str) {
    if let Some(kind) = kind {
        out.push_str("event: ");
        out.push_str(kind);
        out.push('\n');
    }
    out.push_str("data: ");
    out.push_str(text);
    out.push_str("\n\n");
}

/// Where one follower of a job's logs stands in each of its files.
#[derive(Default)]
pub struct LogCursor {
    /// Per attempt and stream (stdout: true), the next byte to read; `None` until the file was first seen.
    pub offsets: BTreeMap<(AttemptId, bool), Option<u64>>,
    /// Per file, where its unended last line started when it was held back (see [`Unended::Hold`]).
    pub held: BTreeMap<(AttemptId, bool), u64>,
    /// Nothing more will be read.
    pub done: bool,
}
