//! Attempt logs on the controller: written as agents stream them, one writer
//! task per connection, into the segments of [`LogStore`]; read back by the API.

use crate::logstore::LogStore;
use crate::shared::Shared;
use cosmos_proto::{AttemptId, LogStream};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;

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
        let written = tokio::task::spawn_blocking(move || shared.logs.append(&chunks)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot write attempt logs"),
            Err(e) => {
                tracing::error!(error = %e, "the attempt log writer failed; this connection's logs stop here");
                return;
            }
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

/// Appends the lines of one log after `*pos` (at most `LOG_READ_CHUNK_BYTES`
/// of them) to `out` as events, moving `*pos` past them. A last line without
/// its newline is treated as `unended` says; `*held` is where such a line
/// started when it was last held back (for [`Unended::Hold`]). A line longer
/// than a whole chunk goes as `partial` pieces. Returns whether more is
/// there to read at once.
pub fn read_log(
    logs: &LogStore,
    (attempt, stream): (AttemptId, LogStream),
    pos: &mut Option<u64>,
    held: &mut Option<u64>,
    start: LogStart,
    unended: Unended,
    out: &mut String,
) -> bool {
    let Some(len) = logs.len(attempt, stream) else { return false };
    let read = |at: u64, max: u64| logs.read_at(attempt, stream, at, max).ok();
    let from = match *pos {
        Some(p) => p,
        None => {
            let mut p = start.offset;
            if let Some(tail) = start.tail_bytes {
                p = p.max(len.saturating_sub(tail));
                // A tail starts at a line's beginning.
                if p > 0 && p < len && read(p - 1, 1).is_some_and(|prev| prev.first() != Some(&b'\n')) {
                    let rest = read(p, LOG_READ_CHUNK_BYTES).unwrap_or_default();
                    match rest.iter().position(|&b| b == b'\n') {
                        Some(nl) => p += nl as u64 + 1,
                        None => p = len,
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
    let Some(buf) = read(from, want) else { return false };
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
