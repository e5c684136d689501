//! What the runtime tests share: collecting one attempt's events.

#![allow(dead_code)]

use cosmos_agent::core::{ExitStatus, RuntimeEvent};
use cosmos_proto::spec::ArtifactRef;
use cosmos_proto::{AttemptId, LOG_CHUNK_BYTES_MAX, LogStream};
use std::time::Duration;
use tokio::sync::mpsc;

/// Guards every wait, so a broken runtime fails the test instead of hanging it.
pub const WAIT: Duration = Duration::from_secs(60);

/// Everything one attempt reported, up to and including its end.
#[derive(Debug, Default)]
pub struct Seen {
    pub started: Option<String>,
    pub start_failed: Option<(String, bool)>,
    pub logs: Vec<(LogStream, u64, Vec<u8>)>,
    pub progress: Vec<(u32, u32)>,
    pub exit: Option<(ExitStatus, Vec<ArtifactRef>)>,
}

impl Seen {
    /// A stream's bytes; checks that chunks are bounded and their offsets count the stream's bytes.
    pub fn stream(&self, stream: LogStream) -> Vec<u8> {
        let mut out = Vec::new();
        for (s, offset, data) in &self.logs {
            if *s == stream {
                assert_eq!(*offset, out.len() as u64, "offsets count the bytes of each stream");
                assert!(data.len() <= LOG_CHUNK_BYTES_MAX && !data.is_empty(), "chunk of {} bytes", data.len());
                out.extend_from_slice(data);
            }
        }
        out
    }

    pub fn text(&self, stream: LogStream) -> String {
        String::from_utf8(self.stream(stream)).expect("the job prints text")
    }

    pub fn status(&self) -> &ExitStatus {
        &self.exit.as_ref().unwrap_or_else(|| panic!("exited: {self:?}")).0
    }
}

pub async fn watch_until(
    rx: &mut mpsc::Receiver<RuntimeEvent>,
    id: AttemptId,
    seen: &mut Seen,
    until: impl Fn(&Seen) -> bool,
) {
    while !until(seen) {
        let event = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no event for {id} in {WAIT:?}; so far: {seen:?}"))
            .expect("channel open");
        match event {
            RuntimeEvent::Started { attempt_id, handle } if attempt_id == id => {
                assert!(seen.started.is_none(), "started twice");
                seen.started = Some(handle)
            }
            RuntimeEvent::StartFailed { attempt_id, reason, retry } if attempt_id == id => {
                seen.start_failed = Some((reason, retry.is_retryable()))
            }
            RuntimeEvent::Log { attempt_id, stream, offset, data } if attempt_id == id => {
                assert!(seen.exit.is_none(), "a log after the exit");
                seen.logs.push((stream, offset, data))
            }
            RuntimeEvent::Progress { attempt_id, step, total } if attempt_id == id => {
                assert!(seen.exit.is_none(), "progress after the exit");
                seen.progress.push((step, total))
            }
            RuntimeEvent::Exited { attempt_id, status, outputs } if attempt_id == id => {
                assert!(seen.exit.is_none(), "exited twice");
                seen.exit = Some((status, outputs))
            }
            _ => {}
        }
    }
}

pub async fn run_to_end(rx: &mut mpsc::Receiver<RuntimeEvent>, id: AttemptId) -> Seen {
    let mut seen = Seen::default();
    watch_until(rx, id, &mut seen, |s| s.exit.is_some() || s.start_failed.is_some()).await;
    seen
}
