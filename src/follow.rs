//! Following jobs to their end through the controller's event stream
//! (`GET /v1/events`): one listing of the jobs, then each change as it comes,
//! instead of listing every job every few hundred milliseconds. A stream cut
//! by a controller restart reconnects from its cursor; one the controller can
//! no longer serve (`resync`) lists the jobs again and follows from there.

use crate::client::{Client, Reconnect, cut_stream};
use anyhow::bail;
use cosmos_controller::http::JobView;
use cosmos_controller::http::jobs::{EVENTS_CURSOR_HEADER, JOBS_PAGE_MAX, NEXT_AFTER_HEADER};
use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::sync::mpsc;
use std::time::Duration;

/// Changes applied per call at most, so a flood of events still lets the caller redraw.
const CHANGES_PER_WAIT_MAX: usize = 10_000;

/// What the reader thread passes on.
enum Item {
    /// A job's new state, at this cursor.
    Job(String, Box<JobView>),
    /// The controller cannot serve the cursor: list again.
    Resync,
    /// The stream ended or broke.
    Ended(anyhow::Error),
}

/// The jobs a command waits for, kept current from the event stream.
pub struct Follower<'a> {
    client: &'a Client,
    /// The wanted jobs' numbers, in the order asked for.
    order: Vec<u64>,
    wanted: BTreeSet<u64>,
    views: BTreeMap<u64, JobView>,
    /// For each job, the event sequence number its view is as new as (from its listing).
    as_of: BTreeMap<u64, u64>,
    /// The last event applied or the listing's position: where a reconnect resumes.
    cursor: String,
    /// Jobs whose view changed since the caller last took them: a wait does
    /// work per change, not per job (a batch of thousands gets thousands of events).
    changed: BTreeSet<u64>,
    items: Option<mpsc::Receiver<Item>>,
}

fn number(id: &str) -> Option<u64> {
    id.strip_prefix("job-")?.parse().ok()
}

fn seq(cursor: &str) -> u64 {
    cursor.rsplit_once(':').and_then(|(_, s)| s.parse().ok()).unwrap_or(0)
}

impl<'a> Follower<'a> {
    /// Lists `ids` and starts following them; fails naming any that does not exist.
    pub fn start(client: &'a Client, ids: &[String], reconnect: &mut Reconnect) -> anyhow::Result<Follower<'a>> {
        let bad: Vec<&str> = ids.iter().filter(|id| number(id).is_none()).map(String::as_str).collect();
        if !bad.is_empty() {
            bail!("no job {}; `cosmos jobs list` shows the ids", bad.join(", "));
        }
        let order: Vec<u64> = ids.iter().filter_map(|id| number(id)).collect();
        let mut f = Follower {
            client,
            wanted: order.iter().copied().collect(),
            order,
            views: BTreeMap::new(),
            as_of: BTreeMap::new(),
            cursor: String::new(),
            changed: BTreeSet::new(),
            items: None,
        };
        f.list(reconnect)?;
        let missing: Vec<String> =
            f.order.iter().filter(|n| !f.views.contains_key(n)).map(|n| format!("job-{n}")).collect();
        // Jobs are never deleted: one that is not listed does not exist, and waiting for it would never end.
        if !missing.is_empty() {
            bail!("no job {}; `cosmos jobs list` shows the ids", missing.join(", "));
        }
        Ok(f)
    }

    /// The jobs, in the order asked for.
    pub fn views(&self) -> Vec<&JobView> {
        self.order.iter().filter_map(|n| self.views.get(n)).collect()
    }

    /// How many of the wanted jobs have a view.
    pub fn known(&self) -> usize {
        self.views.len()
    }

    /// The jobs whose view changed since the last call (all of them, the first time), in id order.
    pub fn take_changed(&mut self) -> Vec<&JobView> {
        let changed = std::mem::take(&mut self.changed);
        changed.into_iter().filter_map(|n| self.views.get(&n)).collect()
    }

    /// Lists the wanted jobs' range of ids, page by page.
    fn list(&mut self, reconnect: &mut Reconnect) -> anyhow::Result<()> {
        let (Some(&first), Some(&last)) = (self.wanted.first(), self.wanted.last()) else { return Ok(()) };
        let mut after = first.saturating_sub(1);
        let mut stream_cursor = None;
        loop {
            let path = format!("/v1/jobs?after=job-{after}&last=job-{last}&limit={JOBS_PAGE_MAX}");
            let (page, headers) = loop {
                match self.client.get_with::<Vec<JobView>>(&path, &[NEXT_AFTER_HEADER, EVENTS_CURSOR_HEADER]) {
                    Ok(v) => {
                        reconnect.reached(self.client);
                        break v;
                    }
                    Err(e) => reconnect.failed(self.client, e)?,
                }
            };
            let Some(cursor) = headers[1].clone() else {
                bail!(
                    "the controller does not stream job events (it answered no {EVENTS_CURSOR_HEADER}): is it older than this client?"
                );
            };
            // Every later page is newer; following from the first page's position misses nothing.
            if stream_cursor.is_none() {
                stream_cursor = Some(cursor.clone());
            }
            for view in page {
                let Some(n) = number(&view.id).filter(|n| self.wanted.contains(n)) else { continue };
                self.as_of.insert(n, seq(&cursor));
                self.views.insert(n, view);
                self.changed.insert(n);
            }
            match headers[0].as_deref().and_then(number) {
                Some(next) if next < last => after = next,
                _ => break,
            }
        }
        self.cursor = stream_cursor.unwrap_or_default();
        Ok(())
    }

    /// Opens the stream from the cursor, read by a thread of its own.
    fn open(&mut self) -> anyhow::Result<()> {
        let reader = self.client.stream(&format!("/v1/events?after={}", self.cursor))?;
        let (tx, rx) = mpsc::sync_channel(CHANGES_PER_WAIT_MAX);
        std::thread::spawn(move || read_events(reader, &tx));
        self.items = Some(rx);
        Ok(())
    }

    /// Waits up to `timeout` for changes of the wanted jobs and applies them;
    /// reconnects (within `reconnect`'s bound) when the stream is cut.
    pub fn wait_change(&mut self, timeout: Duration, reconnect: &mut Reconnect) -> anyhow::Result<()> {
        if self.items.is_none() {
            match self.open() {
                Ok(()) => reconnect.reached(self.client),
                Err(e) => return reconnect.failed(self.client, e),
            }
        }
        let Some(items) = &self.items else { return Ok(()) };
        let mut got = match items.recv_timeout(timeout) {
            Ok(item) => vec![item],
            Err(mpsc::RecvTimeoutError::Timeout) => return Ok(()),
            Err(mpsc::RecvTimeoutError::Disconnected) => vec![Item::Ended(cut_stream())],
        };
        got.extend(items.try_iter().take(CHANGES_PER_WAIT_MAX));
        for item in got {
            match item {
                Item::Job(cursor, view) => {
                    if let Some(n) = number(&view.id).filter(|n| self.wanted.contains(n)) {
                        // A view the listing already had, or newer than this event, stays.
                        if self.as_of.get(&n).is_none_or(|&listed| seq(&cursor) > listed) {
                            self.views.insert(n, *view);
                            self.changed.insert(n);
                        }
                    }
                    self.cursor = cursor;
                }
                Item::Resync => {
                    self.items = None;
                    return self.list(reconnect);
                }
                Item::Ended(e) => {
                    self.items = None;
                    return reconnect.failed(self.client, e);
                }
            }
        }
        Ok(())
    }
}

/// Parses server-sent events into items until the stream ends.
fn read_events(reader: Box<dyn std::io::Read + Send>, tx: &mpsc::SyncSender<Item>) {
    let mut reader = std::io::BufReader::new(reader);
    let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => {
                let _ = tx.send(Item::Ended(cut_stream()));
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(Item::Ended(e.into()));
                return;
            }
        }
        let l = line.trim_end_matches(['\n', '\r']);
        if l.is_empty() {
            let item = match event.as_str() {
                "job" => match serde_json::from_str::<JobView>(&data) {
                    Ok(view) => Some(Item::Job(id.clone(), Box::new(view))),
                    Err(e) => Some(Item::Ended(anyhow::anyhow!("an event the client cannot read: {e}"))),
                },
                "resync" => Some(Item::Resync),
                _ => None,
            };
            event.clear();
            data.clear();
            if let Some(item) = item {
                let end = !matches!(item, Item::Job(..));
                if tx.send(item).is_err() || end {
                    return;
                }
            }
        } else if let Some(v) = l.strip_prefix("id: ") {
            id = v.to_string();
        } else if let Some(v) = l.strip_prefix("event: ") {
            event = v.to_string();
        } else if let Some(v) = l.strip_prefix("data: ") {
            data.push_str(v);
        }
    }
}
