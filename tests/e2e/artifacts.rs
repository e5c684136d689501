//! Inputs and outputs over the agent link, through the real binary: staged
//! from the controller's blob store, cached per host, resumed after a cut,
//! refetched after corruption, delivered back; and a large transfer that
//! leaves heartbeats and cancels through. No assertion depends on the
//! machine's speed: a frame-aware proxy paces, holds back, cuts and corrupts
//! the link, and outcomes are read from the frames it saw, bytes and states.

use super::Cluster;
use cosmos_controller::blobs::Store;
use cosmos_proto::{
    AgentBlob, AgentFrame, AttemptId, BLOB_CHUNK_BYTES, BLOB_FRAME_TAG, BLOB_FRAMES_IN_FLIGHT_PER_CONN_MAX,
    ControllerBlob, ControllerFrame, ControllerMsg, Sha256,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Deterministic bytes that do not repeat within a chunk.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn controller_store(c: &Cluster) -> Store {
    Store::open(c.data().join("blobs")).unwrap()
}

/// Submits one job line; returns its id.
fn submit(c: &Cluster, line: Value) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let path = c.dir.path().join(format!("job-{}.jsonl", SEQ.fetch_add(1, Ordering::SeqCst)));
    std::fs::write(&path, format!("{line}\n")).unwrap();
    let v = c.json(&["jobs", "submit", path.to_str().unwrap(), "--json"]);
    v[0].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
}

fn job(c: &Cluster, id: &str) -> Value {
    c.json(&["jobs", "show", id, "--json"])
}

fn wait_state(c: &Cluster, id: &str, want: &[&str], timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let j = job(c, id);
        if want.contains(&j["state"].as_str().unwrap_or("")) {
            return j;
        }
        assert!(Instant::now() < deadline, "{id} never reached {want:?}: {j}; logs in {}", c.dir.path().display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn input_line(name: &str, command: &[&str], sha: &cosmos_proto::Sha256, size: usize) -> Value {
    json!({
        "name": name,
        "command": command,
        "inputs": [{ "sha256": sha.to_string(), "size_bytes": size, "path": "inputs/x.bin" }],
        "max_attempts": 3,
    })
}

fn agent_log(c: &Cluster, i: usize) -> String {
    std::fs::read_to_string(c.dir.path().join(format!("agent-{i}.log"))).unwrap_or_default()
}

#[test]
fn inputs_are_staged_outputs_are_stored_and_a_second_job_uses_the_cache() {
    let c = Cluster::start(1, 10_000);
    let data = pattern(8 << 20, 1);
    let store = controller_store(&c);
    let (sha, size) = store.put_bytes(&data).unwrap();

    let mut line = input_line("first", &["sh", "-c", "cat inputs/x.bin inputs/x.bin > out.bin"], &sha, data.len());
    line["outputs"] = json!([{ "path": "out.bin", "required": true }]);
    let first = submit(&c, line);
    let j = wait_state(&c, &first, &["succeeded", "failed"], Duration::from_secs(60));
    assert_eq!(j["state"], "succeeded", "{j}");
    let doubled = [data.as_slice(), data.as_slice()].concat();
    let out_sha = cosmos_cas_digest(&doubled);
    assert_eq!(store.size(&out_sha), Some(2 * size), "the output is in the controller's store");
    assert!(store.verify(&out_sha).unwrap(), "the stored output matches its digest");

    // With the controller's copy gone, only the agent's cache can serve the second job.
    std::fs::remove_file(store.path(&sha)).unwrap();
    let second = submit(&c, input_line("second", &["sh", "-c", "test -s inputs/x.bin"], &sha, data.len()));
    let j = wait_state(&c, &second, &["succeeded", "failed"], Duration::from_secs(60));
    assert_eq!(j["state"], "succeeded", "the second job did not use the cache: {j}");
}

fn cosmos_cas_digest(data: &[u8]) -> cosmos_proto::Sha256 {
    let dir = tempfile::tempdir().unwrap();
    Store::open(dir.path()).unwrap().put_bytes(data).unwrap().0
}

#[test]
fn an_input_the_controller_lacks_fails_the_job_without_retries() {
    let c = Cluster::start(1, 10_000);
    let absent = cosmos_cas_digest(b"never uploaded");
    let id = submit(&c, input_line("absent", &["true"], &absent, 14));
    let j = wait_state(&c, &id, &["failed", "succeeded"], Duration::from_secs(60));
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["attempts"], 1, "a missing input is terminal: {j}");
    assert!(j.to_string().contains("not available from the controller"), "{j}");
}

#[test]
fn an_output_whose_bytes_the_controller_holds_uncommitted_is_delivered_at_once() {
    let mut c = Cluster::start(0, 10_000);
    let proxy = Proxy::start_way(c.agent_addr.clone(), Meddling::watch(Way::ToController));
    c.agent_addr = proxy.addr.clone();
    let a = c.spawn_agent(0);
    c.agents.push(Some(a));
    c.wait_agents(1);
    let store = controller_store(&c);
    // Every byte already in the controller's partial file, never committed (a restart mid-commit,
    // a failed commit): the offer must end in Stored, not in "resume at the end" and a long wait.
    let good = "every byte was here already".to_string();
    let good_sha = cosmos_cas_digest(good.as_bytes());
    store.append_partial(&good_sha, 0, good.as_bytes()).unwrap();
    // Bytes of the right length but not the right content: they go and the whole output comes again.
    let other = "the output is something else".to_string();
    let other_sha = cosmos_cas_digest(other.as_bytes());
    store.append_partial(&other_sha, 0, "x".repeat(other.len()).as_bytes()).unwrap();

    for (name, text, sha) in [("uncommitted", &good, good_sha), ("bad-partial", &other, other_sha)] {
        let id = submit(
            &c,
            json!({
                "name": name,
                "command": ["sh", "-c", format!("printf %s '{text}' > out.txt")],
                "outputs": [{ "path": "out.txt", "required": true }],
                "max_attempts": 3,
            }),
        );
        let j = wait_state(&c, &id, &["succeeded", "failed"], Duration::from_secs(60));
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(j["attempts"], 1, "delivered by its first attempt: {j}");
        assert_eq!(store.size(&sha), Some(text.len() as u64));
        assert!(store.verify(&sha).unwrap());
        assert_eq!(store.partial_len(&sha), 0);
    }
    // Nothing waited for the agent's stall check to offer again (that wait would be
    // a second offer): one offer each, answered at once; only the bad bytes came again.
    let seen = proxy.seen();
    assert_eq!(seen.offers.get(&good_sha), Some(&1), "the uncommitted output was offered more than once");
    assert_eq!(seen.offers.get(&other_sha), Some(&1), "the bad partial's output was offered more than once");
    assert_eq!(seen.chunk_bytes.get(&good_sha), None, "bytes the controller held were sent again");
    assert_eq!(seen.chunk_bytes.get(&other_sha), Some(&(other.len() as u64)), "the whole output, once");
}

/// Which way a [`Proxy`] meddles with frames.
#[derive(Clone, Copy, PartialEq)]
enum Way {
    /// Controller to agent: input chunks.
    ToAgent,
    /// Agent to controller: output chunks.
    ToController,
}

/// What a [`Proxy`] does to the frames going its way.
#[derive(Clone, Copy)]
struct Meddling {
    way: Way,
    /// One large frame after this many bytes gets its last byte (blob data) flipped.
    corrupt_after: u64,
    /// The connection is cut once, when this many bytes went through.
    cut_after: u64,
    /// Blob frames' bytes let through per second (0: no limit). A transfer then
    /// lasts at least its size over this rate whatever the machine's speed, as on a slow link.
    blob_bytes_per_s: u64,
}

impl Meddling {
    /// Frames going `way` are watched and passed on untouched.
    fn watch(way: Way) -> Meddling {
        Meddling { way, corrupt_after: u64::MAX, cut_after: u64::MAX, blob_bytes_per_s: 0 }
    }
}

/// What a [`Proxy`] read going its way, decoded. Positions are in blob data
/// bytes (chunk contents) read from the sender so far, whether passed on or held.
#[derive(Default)]
struct Seen {
    /// Blob data read, in all.
    blob_bytes: u64,
    /// Blob data read, by blob.
    chunk_bytes: BTreeMap<Sha256, u64>,
    /// Upload offers, by blob.
    offers: BTreeMap<Sha256, u32>,
    /// Every cancel, with the position it was read at.
    cancels: Vec<(AttemptId, u64)>,
    /// Where the current hold began.
    held_from: Option<u64>,
}

impl Seen {
    fn record(&mut self, way: Way, payload: &[u8]) {
        // The handshake (magic first) decodes as neither and is skipped.
        let chunk = match way {
            Way::ToAgent => match ControllerFrame::decode(payload) {
                Ok(ControllerFrame::Blob(ControllerBlob::Chunk(c))) => Some(c),
                Ok(ControllerFrame::Msg(ControllerMsg::Cancel { attempt_id, .. })) => {
                    self.cancels.push((attempt_id, self.blob_bytes));
                    None
                }
                _ => None,
            },
            Way::ToController => match AgentFrame::decode(payload) {
                Ok(AgentFrame::Blob(AgentBlob::Chunk(c))) => Some(c),
                Ok(AgentFrame::Blob(AgentBlob::Offer { sha256, .. })) => {
                    *self.offers.entry(sha256).or_default() += 1;
                    None
                }
                _ => None,
            },
        };
        if let Some(c) = chunk {
            self.blob_bytes += c.data.len() as u64;
            *self.chunk_bytes.entry(c.sha256).or_default() += c.data.len() as u64;
        }
    }
}

/// A frame-aware TCP proxy. Frames going its way are decoded into [`Seen`],
/// counted, and meddled with as [`Meddling`] says; while [`Proxy::hold`] is on,
/// blob frames going that way are kept back (the messages among them still
/// pass) until it is off again. The other way is copied as is.
struct Proxy {
    addr: String,
    /// Bytes of frames passed on going the proxy's way.
    downstream_bytes: Arc<AtomicU64>,
    seen: Arc<Mutex<Seen>>,
    holding: Arc<AtomicBool>,
}

/// One frame read off the sender: its payload and whether it is blob traffic.
struct Frame {
    payload: Vec<u8>,
    blob: bool,
}

impl Proxy {
    fn start(upstream: String, corrupt_after: u64, cut_after: u64) -> Proxy {
        Proxy::start_way(upstream, Meddling { corrupt_after, cut_after, ..Meddling::watch(Way::ToAgent) })
    }

    fn start_way(upstream: String, m: Meddling) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let proxy = Proxy {
            addr,
            downstream_bytes: Arc::new(AtomicU64::new(0)),
            seen: Arc::new(Mutex::new(Seen::default())),
            holding: Arc::new(AtomicBool::new(false)),
        };
        let (count, seen, holding) = (proxy.downstream_bytes.clone(), proxy.seen.clone(), proxy.holding.clone());
        let (corrupted, cut) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        std::thread::spawn(move || {
            for agent in listener.incoming().flatten() {
                let Ok(ctl) = TcpStream::connect(&upstream) else { continue };
                let (plain_from, plain_to, from, mut to) = match m.way {
                    Way::ToAgent => (agent.try_clone().unwrap(), ctl.try_clone().unwrap(), ctl, agent),
                    Way::ToController => (ctl.try_clone().unwrap(), agent.try_clone().unwrap(), agent, ctl),
                };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut &plain_from, &mut &plain_to);
                    let _ = plain_to.shutdown(Shutdown::Write);
                });
                // A reader decodes frames as they come, so a hold keeps reading (and
                // recording) while the forwarder keeps blob frames back.
                let (frames_tx, frames) = std::sync::mpsc::channel::<Frame>();
                let (seen, from_reader) = (seen.clone(), from.try_clone().unwrap());
                std::thread::spawn(move || {
                    let mut from = from_reader;
                    let mut header = [0u8; 4];
                    while from.read_exact(&mut header).is_ok() {
                        let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
                        if from.read_exact(&mut payload).is_err() {
                            break;
                        }
                        seen.lock().unwrap().record(m.way, &payload);
                        let blob = payload.first() == Some(&BLOB_FRAME_TAG);
                        if frames_tx.send(Frame { payload, blob }).is_err() {
                            break;
                        }
                    }
                });
                let (count, holding, corrupted, cut) = (count.clone(), holding.clone(), corrupted.clone(), cut.clone());
                std::thread::spawn(move || {
                    // Passes one frame on; false once the connection is to end.
                    let mut forward = |mut frame: Frame| -> bool {
                        if frame.blob && m.blob_bytes_per_s > 0 {
                            let secs = frame.payload.len() as f64 / m.blob_bytes_per_s as f64;
                            std::thread::sleep(Duration::from_secs_f64(secs));
                        }
                        let payload = &mut frame.payload;
                        let total = count.fetch_add(4 + payload.len() as u64, Ordering::SeqCst);
                        if total >= m.corrupt_after
                            && payload.len() > 200_000
                            && !corrupted.swap(true, Ordering::SeqCst)
                        {
                            *payload.last_mut().unwrap() ^= 0xFF;
                        }
                        let header = (payload.len() as u32).to_be_bytes();
                        if to.write_all(&header).and_then(|()| to.write_all(payload)).is_err() {
                            return false;
                        }
                        if total >= m.cut_after && !cut.swap(true, Ordering::SeqCst) {
                            let _ = to.shutdown(Shutdown::Both);
                            let _ = from.shutdown(Shutdown::Both);
                            return false;
                        }
                        true
                    };
                    let mut kept = std::collections::VecDeque::new();
                    loop {
                        let next = frames.recv_timeout(Duration::from_millis(10));
                        let hold = holding.load(Ordering::SeqCst);
                        let ended = matches!(next, Err(std::sync::mpsc::RecvTimeoutError::Disconnected));
                        if let Ok(frame) = next {
                            if hold && !frame.blob {
                                if !forward(frame) {
                                    return;
                                }
                            } else {
                                kept.push_back(frame);
                            }
                        }
                        if !hold {
                            while let Some(frame) = kept.pop_front() {
                                if !forward(frame) {
                                    return;
                                }
                            }
                            if ended {
                                let _ = to.shutdown(Shutdown::Write);
                                return;
                            }
                        }
                    }
                });
            }
        });
        proxy
    }

    /// Keeps blob frames back from now on (`true`), or lets them and those kept go (`false`).
    fn hold(&self, on: bool) {
        let mut seen = self.seen.lock().unwrap();
        seen.held_from = on.then_some(seen.blob_bytes);
        self.holding.store(on, Ordering::SeqCst);
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }
}

#[test]
fn a_cut_output_delivery_resumes_and_a_corrupted_chunk_is_sent_again() {
    let mut c = Cluster::start(0, 10_000);
    let size: u64 = 64 << 20;
    let proxy = Proxy::start_way(
        c.agent_addr.clone(),
        Meddling { corrupt_after: 8 << 20, cut_after: 32 << 20, ..Meddling::watch(Way::ToController) },
    );
    c.agent_addr = proxy.addr.clone();
    let a = c.spawn_agent(0);
    c.agents.push(Some(a));
    c.wait_agents(1);

    let make = format!("head -c {size} /dev/urandom > video.mp4");
    let id = submit(
        &c,
        json!({
            "name": "render",
            "command": ["sh", "-c", make],
            "outputs": [{ "path": "video.mp4", "required": true }],
        }),
    );
    let j = wait_state(&c, &id, &["succeeded", "failed"], Duration::from_secs(180));
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["attempts"], 1, "delivered by the attempt that made it, not by running the job again: {j}");
    let moved = proxy.downstream_bytes.load(Ordering::SeqCst);
    println!("moved {moved} bytes to deliver a {size}-byte output across one cut and one corrupted chunk");
    assert!(moved < size + size / 2, "resent too much: {moved} bytes for {size}");
    let made = c.dir.path().join("agent-0/attempts").read_dir().unwrap().flatten().next().unwrap().path();
    let sha = cosmos_cas_digest(&std::fs::read(made.join("video.mp4")).unwrap());
    let store = controller_store(&c);
    assert_eq!(store.size(&sha), Some(size), "the controller holds the output");
    assert!(store.verify(&sha).unwrap(), "and it is the bytes the job wrote");
    let ctl_log = std::fs::read_to_string(c.dir.path().join("ctl.log")).unwrap();
    assert!(ctl_log.contains("failed its checksum"), "the corrupted chunk was not caught; controller log:\n{ctl_log}");
    let log = agent_log(&c, 0);
    assert!(log.contains("resuming an output upload"), "the delivery did not resume; agent log:\n{log}");
}

#[test]
fn a_cut_transfer_resumes_and_a_corrupted_chunk_is_fetched_again() {
    let mut c = Cluster::start(0, 10_000);
    let size = 96usize << 20;
    let data = pattern(size, 2);
    let (sha, _) = controller_store(&c).put_bytes(&data).unwrap();
    let proxy = Proxy::start(c.agent_addr.clone(), 8 << 20, 48 << 20);
    c.agent_addr = proxy.addr.clone();
    let a = c.spawn_agent(0);
    c.agents.push(Some(a));
    c.wait_agents(1);

    let id = submit(&c, input_line("big", &["sh", "-c", "test -s inputs/x.bin"], &sha, size));
    let j = wait_state(&c, &id, &["succeeded", "failed"], Duration::from_secs(180));
    assert_eq!(j["state"], "succeeded", "{j}");
    let moved = proxy.downstream_bytes.load(Ordering::SeqCst);
    println!("moved {moved} bytes to deliver a {size}-byte input across one cut and one corrupted chunk");
    assert!(moved < size as u64 + size as u64 / 4, "resent too much: {moved} bytes for {size}");
    let log = agent_log(&c, 0);
    assert!(log.contains("failed its checksum"), "the corrupted chunk was not caught; agent log:\n{log}");
    assert!(log.contains("resuming an input download"), "the transfer did not resume; agent log:\n{log}");
    // The attempt's finish is acknowledged by now, so its input left the work directory; the cache keeps it.
    let hex = sha.to_string();
    let cached = c.dir.path().join("agent-0/cache/sha256").join(&hex[..2]).join(&hex);
    assert_eq!(cosmos_cas_digest(&std::fs::read(cached).unwrap()), sha);
}

/// Silence after which the controller calls an agent suspect (its default).
const SUSPECT_AFTER_MS: u64 = 3_000;

#[test]
fn a_large_transfer_does_not_make_the_agent_suspect_nor_delay_a_cancel() {
    let mut c = Cluster::start(0, 10_000);
    let size: usize = std::env::var("COSMOS_E2E_LARGE_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(256 << 20);
    // The link runs at a fixed rate, so the transfer lasts at least size / rate on any
    // machine: long enough for a starved heartbeat to make the agent suspect.
    let rate: u64 = 32 << 20;
    let min_transfer_ms = size as u64 * 1000 / rate;
    assert!(min_transfer_ms >= 2 * SUSPECT_AFTER_MS, "a {size}-byte transfer is too short to prove anything");
    let proxy =
        Proxy::start_way(c.agent_addr.clone(), Meddling { blob_bytes_per_s: rate, ..Meddling::watch(Way::ToAgent) });
    c.agent_addr = proxy.addr.clone();
    let a = c.spawn_agent(0);
    c.agents.push(Some(a));
    c.wait_agents(1);
    let (sha, _) = {
        let store = controller_store(&c);
        let block = pattern(4 << 20, 3);
        // Blocks of the pattern, each stamped with its index, so no two chunks are alike.
        let blocks = (0..size / block.len()).map(move |i| {
            let mut b = block.clone();
            b[..8].copy_from_slice(&(i as u64).to_le_bytes());
            b
        });
        store.put_reader(IterReader { blocks: Box::new(blocks), current: Vec::new(), pos: 0 }, None).unwrap()
    };
    let size = size / (4 << 20) * (4 << 20);

    let sleeper = submit(&c, json!({ "name": "sleeper", "command": ["sleep", "120"] }));
    wait_state(&c, &sleeper, &["running"], Duration::from_secs(30));
    let big = submit(&c, input_line("big", &["true"], &sha, size));

    // Watch the agent's state all along, from another thread.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (done, api, data) = (done.clone(), c.api.clone(), c.data());
        std::thread::spawn(move || {
            let mut states = std::collections::BTreeSet::new();
            while !done.load(Ordering::SeqCst) {
                let out = std::process::Command::new(super::BIN)
                    .args(["agents", "list", "--json"])
                    .env("COSMOS_CONTROLLER", &api)
                    .env("COSMOS_DATA_DIR", &data)
                    .output()
                    .unwrap();
                if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
                    states.insert(v[0]["state"].as_str().unwrap_or("?").to_string());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            states
        })
    };

    let partial = c.dir.path().join("agent-0/cache/partial").join(sha.to_string());
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < (size as u64) / 8 {
        assert!(Instant::now() < deadline, "the transfer never got going");
        std::thread::sleep(Duration::from_millis(10));
    }
    // From here the proxy keeps the transfer's chunks back, so it cannot end
    // before the cancel has, however fast the machine, and the cancel's frame
    // shows where the controller put it among the chunks it sent.
    proxy.hold(true);
    let t0 = Instant::now();
    let out = c.cli(&["jobs", "cancel", &sleeper]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_state(&c, &sleeper, &["cancelled"], Duration::from_secs(30));
    let cancel_ms = t0.elapsed().as_millis();
    let (held_from, cancels) = {
        let seen = proxy.seen();
        (seen.held_from.unwrap(), seen.cancels.clone())
    };
    // Gone would mean finished: count that as all of it.
    let staged = std::fs::metadata(&partial).map_or(u64::MAX, |m| m.len());
    proxy.hold(false);

    let t1 = Instant::now();
    let j = wait_state(&c, &big, &["succeeded", "failed"], Duration::from_secs(600));
    done.store(true, Ordering::SeqCst);
    let states = watcher.join().unwrap();
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(cancels.len(), 1, "one cancel for the sleeper: {cancels:?}");
    // The agent asks for at most a window of chunks ahead, and none reached it
    // during the hold: a controller that sent the cancel behind more (the rest of
    // the blob queued first) would show it here.
    let behind = cancels[0].1 - held_from;
    let window = (BLOB_FRAMES_IN_FLIGHT_PER_CONN_MAX as u64) * u64::from(BLOB_CHUNK_BYTES);
    println!(
        "cancel took {cancel_ms} ms during a {size}-byte transfer at {rate} bytes/s (agent held {staged} bytes \
         when it landed, the cancel behind {behind} bytes of chunks); transfer finished {} ms later; agent states seen: {states:?}",
        t1.elapsed().as_millis()
    );
    assert!(behind <= window, "the cancel left the controller behind {behind} bytes of chunks, more than a window");
    // The agent carried the cancel out with the transfer stopped half way: it did not wait for it.
    assert!(staged < size as u64, "the transfer had ended before the cancel landed");
    assert_eq!(states.into_iter().collect::<Vec<_>>(), ["up"], "the agent looked unwell during the transfer");
    assert!(!agent_log(&c, 0).contains("lost the controller"), "the link was dropped during the transfer");
}

struct IterReader {
    blocks: Box<dyn Iterator<Item = Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for IterReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.current.len() {
            match self.blocks.next() {
                Some(b) => (self.current, self.pos) = (b, 0),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
