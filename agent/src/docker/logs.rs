//! Following a container's output into the attempt's log files and, as
//! `Log` and `Progress` events, to the core.

use super::Shared;
use crate::core::RuntimeEvent;
use crate::process::{ProgressParser, STDERR_FILE, STDOUT_FILE};
use crate::runtime::EventSender;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::LogsOptions;
use cosmos_proto::{AttemptId, LOG_CHUNK_BYTES_MAX, LogStream};
use futures::StreamExt;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// After a container exited, how long its log stream may take to end before it is cut.
pub(super) const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Follows a container's output from its start until its end: appends what
/// the log files lack, and (with `events`) reports it as `Log` and `Progress`.
///
/// Every pass reads the container's output from its start and skips what an
/// earlier pass delivered: after a transport error, and once more after the
/// container's exit is known, without following. The engine may end a
/// followed stream at the container's stop before its log driver has flushed
/// the last unterminated line (Docker 20.10 does); the last pass reads that.
///
/// The first pass of a container this agent started reads `live`, the stream
/// it attached to before the start, in place of the followed logs: the log
/// driver holds a line back until its newline (or 16 KiB), so a progress
/// bar redrawn after `\r` would reach the log only at the bar's end, while an
/// attached stream carries each write as it is made. Both carry the same
/// bytes, so the passes after it skip what it delivered as they would their own.
pub(super) struct LogFollower {
    pub(super) attempt_id: AttemptId,
    pub(super) container: String,
    pub(super) dir: PathBuf,
    pub(super) events: Option<EventSender>,
    pub(super) live: Option<LiveOutput>,
}

/// A container's output as the engine streams it: attached, or its logs.
pub(super) type LiveOutput = std::pin::Pin<Box<dyn futures::Stream<Item = Result<LogOutput, BollardError>> + Send>>;

impl LogFollower {
    /// `exited` turns true once the container's end is known.
    pub(super) async fn run(mut self, shared: Arc<Shared>, mut exited: watch::Receiver<bool>) {
        let id = self.attempt_id;
        let mut files: Vec<(Option<std::fs::File>, u64)> = [STDOUT_FILE, STDERR_FILE]
            .iter()
            .map(|name| {
                let path = self.dir.join(name);
                let have = std::fs::metadata(&path).map_or(0, |m| m.len());
                let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
                if let Err(e) = &file {
                    tracing::warn!(attempt = %id, path = %path.display(), error = %e, "cannot write an attempt's log");
                }
                (file.ok(), have)
            })
            .collect();
        let mut offsets = [0u64; 2];
        let mut parsers = [ProgressParser::default(), ProgressParser::default()];
        let mut last_progress: Option<(u32, u32)> = None;
        let mut retries = 0u32;
        'pass: loop {
            let last_pass = *exited.borrow_and_update();
            let docker = match shared.long_client().await {
                Ok(d) => d,
                Err(e) => {
                    if retries % 60 == 0 {
                        tracing::warn!(attempt = %id, error = %e, "cannot follow an attempt's logs; retrying every second");
                    }
                    retries += 1;
                    tokio::time::sleep(super::RETRY_DELAY).await;
                    continue;
                }
            };
            let options = LogsOptions { follow: !last_pass, stdout: true, stderr: true, ..Default::default() };
            let mut stream: LiveOutput = match self.live.take() {
                Some(live) if !last_pass => live,
                _ => Box::pin(docker.logs(&self.container, Some(options))),
            };
            let mut seen = [0u64; 2];
            while let Some(item) = stream.next().await {
                let (index, stream_kind, message) = match item {
                    Ok(LogOutput::StdOut { message }) => (0, LogStream::Stdout, message),
                    Ok(LogOutput::StdErr { message }) => (1, LogStream::Stderr, message),
                    Ok(_) => continue,
                    Err(e) => {
                        let e = shared.error("read a container's logs", e);
                        if e.is_unreachable() {
                            if retries % 60 == 0 {
                                tracing::warn!(attempt = %id, error = %e, "lost a container's log stream; reconnecting");
                            }
                            retries += 1;
                            tokio::time::sleep(super::RETRY_DELAY).await;
                            continue 'pass;
                        }
                        if !e.is_not_found() {
                            tracing::warn!(attempt = %id, error = %e, "cannot read a container's logs");
                        }
                        return;
                    }
                };
                // Skip what an earlier connection already delivered.
                let start = seen[index];
                seen[index] += message.len() as u64;
                let skip = offsets[index].saturating_sub(start).min(message.len() as u64) as usize;
                let data = &message[skip..];
                if data.is_empty() {
                    continue;
                }
                let offset = offsets[index];
                offsets[index] += data.len() as u64;
                let (file, have) = &mut files[index];
                // The file may hold the start already (a previous agent wrote it): append the rest.
                if let Some(f) = file {
                    let from = have.saturating_sub(offset).min(data.len() as u64) as usize;
                    if from < data.len() {
                        if let Err(e) = f.write_all(&data[from..]) {
                            tracing::warn!(attempt = %id, error = %e, "cannot write an attempt's log");
                            *file = None;
                        }
                    }
                }
                *have = (*have).max(offsets[index]);
                let Some(events) = &self.events else { continue };
                let mut chunk_offset = offset;
                for chunk in data.chunks(LOG_CHUNK_BYTES_MAX) {
                    let event = RuntimeEvent::Log {
                        attempt_id: id,
                        stream: stream_kind,
                        offset: chunk_offset,
                        data: chunk.to_vec(),
                    };
                    if events.send(event).await.is_err() {
                        return;
                    }
                    chunk_offset += chunk.len() as u64;
                }
                // Each frame is one write of the job's: a tqdm redraw after `\r` is complete in it.
                let parser = &mut parsers[index];
                let step = parser.feed(data);
                if let Some(p) = parser.pending().or(step) {
                    if last_progress != Some(p) {
                        last_progress = Some(p);
                        let event = RuntimeEvent::Progress { attempt_id: id, step: p.0, total: p.1 };
                        if events.send(event).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if last_pass {
                return;
            }
            // The followed stream ended with the container: wait for its exit, then read what is left.
            let _ = exited.wait_for(|e| *e).await;
        }
    }
}
