//! Traces over OTLP (HTTP/protobuf and gRPC): the controller and an agent,
//! real processes, export to a collector inside the test that decodes what it
//! receives with the OpenTelemetry protocol's own generated types
//! (opentelemetry-proto); its gRPC side is `h2`'s HTTP/2 server (the one tonic
//! runs on) holding each call to the gRPC-over-HTTP/2 protocol.

use super::*;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Bound on every wait of these tests.
const WAIT: Duration = Duration::from_secs(60);

/// One span as the collector received it.
#[derive(Clone, Debug)]
struct Span {
    trace: String,
    id: String,
    parent: String,
    name: String,
    service: String,
    resource: BTreeMap<String, String>,
    attrs: BTreeMap<String, String>,
    events: Vec<(String, BTreeMap<String, String>)>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    status: i32,
    start_ns: u64,
    end_ns: u64,
}

impl Span {
    fn attr(&self, k: &str) -> &str {
        self.attrs.get(k).map(String::as_str).unwrap_or("")
    }
}

fn value(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::ArrayValue(a)) => {
            a.values.iter().map(|v| value(&Some(v.clone()))).collect::<Vec<_>>().join(",")
        }
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), value(&kv.value))).collect()
}

/// Which OTLP transport a collector speaks.
#[derive(Copy, Clone, Debug, PartialEq)]
enum Wire {
    Http,
    Grpc,
}

/// An OTLP receiver on a loopback port: over HTTP answers every `POST
/// /v1/traces` of protobuf with an empty `ExportTraceServiceResponse`; over
/// gRPC every `TraceService/Export` call; either way keeping the spans.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    /// (path, content type) of every request.
    requests: Arc<Mutex<Vec<(String, String)>>>,
}

impl Collector {
    fn start() -> Collector {
        Collector::speaking(Wire::Http)
    }

    fn speaking(wire: Wire) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (spans.clone(), requests.clone());
        match wire {
            Wire::Http => std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let (s, r) = (s.clone(), r.clone());
                    std::thread::spawn(move || serve(stream, &s, &r));
                }
            }),
            Wire::Grpc => std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async move {
                    listener.set_nonblocking(true).unwrap();
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    loop {
                        let Ok((stream, _)) = listener.accept().await else { continue };
                        tokio::spawn(serve_grpc(stream, s.clone(), r.clone()));
                    }
                })
            }),
        };
        Collector { addr, spans, requests }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `done` holds of the spans received, and returns them.
    fn wait(&self, what: &str, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + WAIT;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; spans so far: {spans:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Serves one connection's requests (the exporter keeps its connection open between batches).
fn serve(mut stream: TcpStream, spans: &Mutex<Vec<Span>>, requests: &Mutex<Vec<(String, String)>>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.lines();
        let path = lines.next().unwrap_or("").split_whitespace().nth(1).unwrap_or("").to_string();
        let mut len = 0;
        let mut ctype = String::new();
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    "content-type" => ctype = v.trim().to_string(),
                    _ => {}
                }
            }
        }
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 65536];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
        requests.lock().unwrap().push((path, ctype));
        keep(&body, spans);
        let answer = ExportTraceServiceResponse::default().encode_to_vec();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
            answer.len()
        );
        if stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&answer)).is_err() {
            return;
        }
    }
}

/// The one method of the OTLP trace service (`opentelemetry/proto/collector/trace/v1/trace_service.proto`).
const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Serves one HTTP/2 connection's gRPC calls, holding each to the
/// gRPC-over-HTTP/2 protocol (`grpc/doc/PROTOCOL-HTTP2.md`): a POST with
/// `content-type: application/grpc` and `te: trailers`, one length-prefixed
/// uncompressed message; the answer one message, status in the trailers.
async fn serve_grpc(
    stream: tokio::net::TcpStream,
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<Vec<(String, String)>>>,
) {
    let Ok(mut conn) = h2::server::handshake(stream).await else { return };
    // Each call on a task of its own: the connection makes progress only while `accept` is polled.
    while let Some(Ok((req, respond))) = conn.accept().await {
        tokio::spawn(answer_grpc(req, respond, spans.clone(), requests.clone()));
    }
}

async fn answer_grpc(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<Vec<(String, String)>>>,
) {
    {
        let (head, mut body) = req.into_parts();
        let header = |k: &str| head.headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let Ok(chunk) = chunk else { return };
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        // What breaks the protocol is recorded as the request's path, for the test to show.
        let len = data.get(1..5).map_or(0, |l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize);
        let broken = [
            (head.method != "POST", "not a POST"),
            (head.version != http::Version::HTTP_2, "not HTTP/2"),
            (header("te") != "trailers", "no `te: trailers`"),
            (!header("user-agent").starts_with("OTel-OTLP-Exporter-Rust/"), "not the exporter's user-agent"),
            (data.first() != Some(&0), "not one uncompressed length-prefixed message"),
            (data.len() != 5 + len, "not exactly one message (a unary call)"),
        ];
        let path = match broken.iter().find(|(b, _)| *b) {
            Some((_, what)) => format!("broken: {what}: {head:?}"),
            None => head.uri.path().to_string(),
        };
        let ok = path.starts_with('/');
        requests.lock().unwrap().push((path, header("content-type")));
        if !ok {
            return;
        }
        keep(&data[5..], &spans);
        let answer = ExportTraceServiceResponse::default().encode_to_vec();
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(answer.len() as u32).to_be_bytes());
        frame.extend_from_slice(&answer);
        let response = http::Response::builder().header("content-type", "application/grpc").body(()).unwrap();
        let Ok(mut send) = respond.send_response(response, false) else { return };
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let _ = send.send_data(frame.into(), false).and_then(|()| send.send_trailers(trailers));
    }
}

/// Decodes one `ExportTraceServiceRequest` and keeps its spans.
fn keep(body: &[u8], spans: &Mutex<Vec<Span>>) {
    {
        let req = ExportTraceServiceRequest::decode(body).expect("the body is an ExportTraceServiceRequest");
        let mut got = Vec::new();
        for rs in &req.resource_spans {
            let resource = rs.resource.as_ref().map(|r| attrs(&r.attributes)).unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in &rs.scope_spans {
                for sp in &ss.spans {
                    got.push(Span {
                        trace: hex::encode(&sp.trace_id),
                        id: hex::encode(&sp.span_id),
                        parent: hex::encode(&sp.parent_span_id),
                        name: sp.name.clone(),
                        service: service.clone(),
                        resource: resource.clone(),
                        attrs: attrs(&sp.attributes),
                        events: sp.events.iter().map(|e| (e.name.clone(), attrs(&e.attributes))).collect(),
                        status: sp.status.as_ref().map_or(0, |s| s.code),
                        start_ns: sp.start_time_unix_nano,
                        end_ns: sp.end_time_unix_nano,
                    });
                }
            }
        }
        spans.lock().unwrap().extend(got);
    }
}

/// The environment that points both daemons at `endpoint`, exporting every 50 ms.
fn otel_env(endpoint: &str) -> Vec<(String, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.into()),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "50".into()),
        ("OTEL_RESOURCE_ATTRIBUTES".into(), "deployment.environment=e2e".into()),
    ]
}

fn traced_cluster(env: Vec<(String, String)>) -> Cluster {
    traced_cluster_losing_agents_after(env, 10_000)
}

fn traced_cluster_losing_agents_after(env: Vec<(String, String)>, lost_after_ms: u64) -> Cluster {
    Cluster::start_env(tempfile::tempdir().unwrap(), 1, lost_after_ms, Vec::new(), env.clone(), env, |_| Vec::new())
}

fn submit_line(c: &Cluster, name: &str, line: Value) -> String {
    let path = c.dir.path().join(format!("{name}.jsonl"));
    std::fs::write(&path, format!("{line}\n")).unwrap();
    let v = c.json(&["jobs", "submit", path.to_str().unwrap(), "--json"]);
    v[0].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
}

fn wait_job(c: &Cluster, id: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let j = c.json(&["jobs", "show", id, "--json"]);
        if matches!(j["state"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            return j;
        }
        assert!(Instant::now() < deadline, "{id} did not end: {j}; logs in {}", c.dir.path().display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The spans of the trace whose root is job `id`'s.
fn trace_of<'a>(spans: &'a [Span], id: &str) -> Vec<&'a Span> {
    let Some(root) = spans.iter().find(|s| s.name == "job" && s.attr("cosmos.job.id") == id) else {
        return Vec::new();
    };
    spans.iter().filter(|s| s.trace == root.trace).collect()
}

fn one<'a>(spans: &[&'a Span], name: &str) -> &'a Span {
    let found: Vec<&&Span> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one `{name}` span expected: {spans:#?}");
    found[0]
}

#[test]
fn one_jobs_spans_from_controller_and_agent_share_its_trace_with_the_right_parents() {
    one_jobs_trace_over(Wire::Http);
}

#[test]
fn one_jobs_spans_from_controller_and_agent_share_its_trace_over_grpc() {
    one_jobs_trace_over(Wire::Grpc);
}

fn one_jobs_trace_over(wire: Wire) {
    let collector = Collector::speaking(wire);
    let mut env = otel_env(&collector.endpoint());
    env.push(("COSMOS_LOG_FORMAT".into(), "json".into()));
    if wire == Wire::Grpc {
        env.push(("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "grpc".into()));
    }
    let c = traced_cluster(env);
    let data = b"an input the agent stages".repeat(100);
    let store = cosmos_cas::Store::open(c.data().join("blobs")).unwrap();
    let (sha, size) = store.put_bytes(&data).unwrap();
    let id = submit_line(
        &c,
        "traced",
        serde_json::json!({
            "name": "traced",
            "command": ["sh", "-c", "for i in 1 2 3; do echo \"$i/3\"; sleep 0.1; done; cat inputs/x.bin > out.bin"],
            "inputs": [{ "sha256": sha.to_string(), "size_bytes": size, "path": "inputs/x.bin" }],
            "outputs": [{ "path": "out.bin", "required": true }],
        }),
    );
    let j = wait_job(&c, &id);
    assert_eq!(j["state"], "succeeded", "{j}");

    let spans = collector.wait("the job's trace with the agent's spans", |s| {
        let t = trace_of(s, &id);
        ["submit", "queued", "attempt", "running", "stage inputs", "start", "deliver outputs"]
            .iter()
            .all(|n| t.iter().any(|sp| sp.name == *n))
    });
    let trace = trace_of(&spans, &id);
    let root = one(&trace, "job");
    assert_eq!(root.parent, "", "the job's span is the trace's root");
    assert_eq!(root.service, "cosmos-controller");
    assert_eq!(root.attr("cosmos.job.state"), "succeeded");
    assert_eq!(root.status, 1, "a succeeded job's span is OK");
    assert_eq!(root.resource.get("deployment.environment").map(String::as_str), Some("e2e"), "{root:?}");
    for name in ["submit", "queued", "attempt"] {
        let s = one(&trace, name);
        assert_eq!(s.parent, root.id, "`{name}` is a child of the job's span");
        assert_eq!(s.service, "cosmos-controller");
    }
    let submit = one(&trace, "submit");
    assert_eq!(submit.attr("cosmos.batch.size"), "1");
    let queued = one(&trace, "queued");
    assert_eq!(queued.attr("cosmos.placement.host"), "agent-0");
    assert!(queued.attr("cosmos.placement.gpus").starts_with("GPU-sim-agent-0-"), "{queued:?}");
    let attempt = one(&trace, "attempt");
    assert_eq!(attempt.attr("cosmos.attempt.state"), "succeeded");
    assert_eq!(attempt.attr("cosmos.placement.host"), "agent-0");
    assert!(root.start_ns <= attempt.start_ns && attempt.end_ns <= root.end_ns, "{root:?} {attempt:?}");

    let running = one(&trace, "running");
    assert_eq!(running.parent, attempt.id);
    let progress: Vec<&str> =
        running.events.iter().filter(|(n, _)| n == "progress").map(|(_, a)| a["step"].as_str()).collect();
    assert!(progress.contains(&"3"), "progress reports are events of the running span: {running:?}");

    for name in ["stage inputs", "start", "deliver outputs"] {
        let s = one(&trace, name);
        assert_eq!(s.parent, attempt.id, "the agent's `{name}` is a child of the controller's attempt span");
        assert_eq!(s.service, "cosmos-agent", "{s:?}");
        assert_eq!(s.resource.get("cosmos.agent.name").map(String::as_str), Some("agent-0"), "{s:?}");
        assert!(s.resource.contains_key("host.name"), "{s:?}");
    }
    let stage = one(&trace, "stage inputs");
    assert_eq!(stage.attr("cosmos.inputs.bytes"), size.to_string());
    assert_eq!((stage.attr("cosmos.cache.hits"), stage.attr("cosmos.cache.misses")), ("0", "1"), "{stage:?}");
    assert_eq!(one(&trace, "deliver outputs").attr("cosmos.outputs.bytes"), size.to_string());
    assert_eq!(one(&trace, "start").attr("cosmos.runtime"), "process");

    // Log lines inside a traced operation name its trace and span at the top level: the
    // agent's about the attempt's phases (the controller's attempt span), the controller's
    // about the job (its root span).
    let line = |file: &str, message: &str| -> Value {
        let log = std::fs::read_to_string(c.dir.path().join(file)).unwrap();
        log.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["message"] == message)
            .unwrap_or_else(|| panic!("no `{message}` line in {file}:\n{log}"))
    };
    let started = line("agent-0.log", "starting attempt");
    assert_eq!(started["trace_id"], root.trace.as_str(), "{started}");
    assert_eq!(started["span_id"], attempt.id.as_str(), "{started}");
    let ended = line("ctl.log", "job ended");
    assert_eq!(ended["trace_id"], root.trace.as_str(), "{ended}");
    assert_eq!(ended["span_id"], root.id.as_str(), "{ended}");
    assert_eq!(ended["state"], "succeeded", "{ended}");
    let outside = line("ctl.log", "controller starting");
    assert!(outside.get("trace_id").is_none(), "a line outside any traced operation names none: {outside}");

    let requests = collector.requests.lock().unwrap().clone();
    let (path, ctype) = match wire {
        Wire::Http => ("/v1/traces", "application/x-protobuf"),
        Wire::Grpc => (GRPC_EXPORT, "application/grpc"),
    };
    assert!(requests.iter().all(|(p, c)| p == path && c == ctype), "{requests:?}");
}

#[test]
fn a_retried_job_shows_both_attempts_and_the_reason_in_one_trace() {
    let collector = Collector::start();
    let c = traced_cluster(otel_env(&collector.endpoint()));
    let marker = c.dir.path().join("second-time");
    let script = format!(
        "if [ -e {m} ]; then exit 0; fi; touch {m}; echo 'CUDA out of memory' >&2; exit 3",
        m = marker.display()
    );
    let id = submit_line(
        &c,
        "flaky",
        serde_json::json!({ "name": "flaky", "command": ["sh", "-c", script], "max_attempts": 3 }),
    );
    let j = wait_job(&c, &id);
    assert_eq!(j["state"], "succeeded", "{j}");
    // The agent exports its spans on its own schedule, so wait for its two `start` spans too.
    let spans = collector.wait("both attempts, from controller and agent", |s| {
        let trace = trace_of(s, &id);
        // Spans of that name from any service, or from the agent's alone.
        let count = |name: &str, agent_only: bool| {
            trace.iter().filter(|s| s.name == name && (!agent_only || s.service == "cosmos-agent")).count()
        };
        count("attempt", false) == 2
            && count("queued", false) == 2
            && count("start", true) == 2
            && count("retry backoff", false) == 1
    });
    let trace = trace_of(&spans, &id);
    let mut attempts: Vec<&&Span> = trace.iter().filter(|s| s.name == "attempt").collect();
    attempts.sort_by_key(|s| s.start_ns);
    assert_eq!(attempts[0].attr("cosmos.attempt.state"), "failed");
    assert_eq!(attempts[0].status, 2, "a failed attempt's span is an error");
    assert_eq!(attempts[0].attr("cosmos.attempt.exit_code"), "3");
    assert_eq!(attempts[1].attr("cosmos.attempt.state"), "succeeded");
    assert_ne!(attempts[0].id, attempts[1].id);
    let backoff = one(&trace, "retry backoff");
    assert!(backoff.attr("cosmos.retry.reason").contains("CUDA out of memory"), "{backoff:?}");
    // In order (the controller's clock, to the millisecond; its deadlines run on another clock).
    let slack_ns = 50_000_000;
    assert!(attempts[0].end_ns <= backoff.start_ns + slack_ns, "{attempts:?} {backoff:?}");
    assert!(backoff.end_ns <= attempts[1].start_ns + slack_ns, "{attempts:?} {backoff:?}");
    assert_eq!(trace.iter().filter(|s| s.name == "queued").count(), 2, "each attempt was placed: {trace:#?}");
    assert_eq!(trace.iter().filter(|s| s.name == "start" && s.service == "cosmos-agent").count(), 2);
}

#[test]
fn a_controller_restarted_mid_run_continues_the_jobs_trace() {
    let collector = Collector::start();
    let mut c = traced_cluster(otel_env(&collector.endpoint()));
    let id = submit_line(
        &c,
        "long",
        serde_json::json!({ "name": "long", "command": ["sh", "-c", "sleep 2"], "max_attempts": 1 }),
    );
    // The agent's `start` span and the first controller's `submit` are exported before it dies.
    let before = collector.wait("the agent's start span", |s| {
        s.iter().any(|s| s.name == "start") && s.iter().any(|s| s.name == "submit")
    });
    let start = before.iter().find(|s| s.name == "start").unwrap().clone();
    Cluster::kill9(&mut c.controller);
    let (api, agents) = (c.api.trim_start_matches("http://").to_string(), c.agent_addr.clone());
    c.start_controller(&api, &agents);
    let j = wait_job(&c, &id);
    assert_eq!(j["state"], "succeeded", "{j}");
    let spans = collector.wait("the job's attempt and running spans", |s| {
        let t = trace_of(s, &id);
        t.iter().any(|s| s.name == "attempt") && t.iter().any(|s| s.name == "running")
    });
    let trace = trace_of(&spans, &id);
    let attempt = one(&trace, "attempt");
    assert_eq!(start.trace, attempt.trace, "the restarted controller's spans are in the same trace");
    assert_eq!(start.parent, attempt.id, "the agent's span, sent before the restart, has the attempt as parent");
    let submit = before.iter().find(|s| s.name == "submit").unwrap();
    assert_eq!(submit.trace, attempt.trace, "the first controller's submit is in the same trace");
    let running = one(&trace, "running");
    assert_eq!(running.attr("cosmos.controller.restarted"), "true", "{running:?}");
}

#[test]
fn an_agent_restarted_mid_run_goes_on_with_the_attempts_spans_in_the_jobs_trace() {
    let collector = Collector::start();
    // Never lost while it is down: the attempt must be adopted, not run again.
    let mut c = traced_cluster_losing_agents_after(otel_env(&collector.endpoint()), 300_000);
    let id = submit_line(
        &c,
        "adopted",
        serde_json::json!({
            "name": "adopted",
            "command": ["sh", "-c", "sleep 3; echo done > out.txt"],
            "outputs": [{ "path": "out.txt", "required": true }],
            "max_attempts": 1,
        }),
    );
    // The first agent's `start` span is exported: the attempt runs under it.
    let before = collector.wait("the first agent's start span", |s| s.iter().any(|s| s.name == "start"));
    let start = before.iter().find(|s| s.name == "start").unwrap().clone();
    Cluster::kill9(&mut c.agents[0]);
    let restarted_ns = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    c.agents[0] = Some(c.spawn_agent(0));
    c.wait_agents(1);
    let j = wait_job(&c, &id);
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["attempts"], 1, "the attempt was adopted, not run again: {j}");
    let spans = collector.wait("the restarted agent's delivery span and the job's root", |s| {
        let t = trace_of(s, &id);
        t.iter().any(|s| s.name == "deliver outputs") && t.iter().any(|s| s.name == "attempt")
    });
    let trace = trace_of(&spans, &id);
    let attempt = one(&trace, "attempt");
    let deliver = one(&trace, "deliver outputs");
    assert_eq!(deliver.service, "cosmos-agent");
    assert!(deliver.start_ns >= restarted_ns, "delivered by the restarted agent: {deliver:?}");
    assert_eq!(deliver.trace, start.trace, "the restarted agent's span is in the job's trace");
    assert_eq!(deliver.parent, attempt.id, "and a child of the same attempt span as the first agent's");
    assert_eq!(start.parent, attempt.id);
}

/// A listener that takes connections and never answers: a collector that hangs.
fn black_hole() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (l, url)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

#[test]
fn a_collector_that_hangs_loses_spans_counted_and_jobs_run_on() {
    let (_hole, url) = black_hole();
    let mut env = otel_env(&url);
    env.extend([
        // Each export waits this long for an answer that never comes.
        ("OTEL_EXPORTER_OTLP_TIMEOUT".to_string(), "120000".to_string()),
        ("OTEL_BSP_MAX_QUEUE_SIZE".to_string(), "4".to_string()),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE".to_string(), "1".to_string()),
    ]);
    let c = traced_cluster(env);
    let lines: String = (0..10)
        .map(|i| serde_json::json!({ "name": format!("j{i}"), "command": ["true"] }).to_string() + "\n")
        .collect();
    let batch = c.dir.path().join("ten.jsonl");
    std::fs::write(&batch, lines).unwrap();
    let v = c.json(&["jobs", "submit", batch.to_str().unwrap(), "--json", "--wait"]);
    assert!(v.as_array().unwrap().iter().all(|j| j["state"] == "succeeded"), "{v}");
    let text = ureq::get(format!("{}/metrics", c.api)).call().unwrap().body_mut().read_to_string().unwrap();
    // Every job ended while the exporter's first request still waited on the collector:
    // scheduling never waited for export.
    assert_eq!(metric(&text, "cosmos_spans_exported_total"), 0.0, "{text}");
    assert!(metric(&text, "cosmos_spans_dropped_total{reason=\"queue_full\"}") > 0.0, "{text}");
}
