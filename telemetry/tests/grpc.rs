//! The exporter over OTLP/gRPC against an HTTP/2 server (`h2`, the one tonic
//! runs on) that answers as a collector would: OK, a retryable status, a
//! terminal one, in the trailers or trailers-only.

use cosmos_telemetry::export::DropLabels;
use cosmos_telemetry::{Exporter, Protocol, SpanBuilder, SpanCounters, SpanId, TraceConfig, TraceId};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How the collector answers its n-th call (the last one repeats).
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// grpc-status 0 after one empty `ExportTraceServiceResponse`.
    Ok,
    /// This status, trailers-only (no message), as servers answer errors.
    Status(u32),
}

/// One call as the collector saw it: path, content-type, te, message bytes.
type Seen = (String, String, String, usize);

fn collector(answers: Vec<Answer>) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (s, answers) = (s.clone(), answers.clone());
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else { return };
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        tokio::spawn(answer(req, respond, s.clone(), answers.clone()));
                    }
                });
            }
        })
    });
    (addr, seen)
}

async fn answer(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
    seen: Arc<Mutex<Vec<Seen>>>,
    answers: Vec<Answer>,
) {
    let (head, mut body) = req.into_parts();
    let mut data = Vec::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let header = |k: &str| head.headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let n = {
        let mut seen = seen.lock().unwrap();
        seen.push((head.uri.path().to_string(), header("content-type"), header("te"), data.len()));
        seen.len() - 1
    };
    let response = http::Response::builder().header("content-type", "application/grpc");
    match answers[n.min(answers.len() - 1)] {
        Answer::Ok => {
            let Ok(mut send) = respond.send_response(response.body(()).unwrap(), false) else { return };
            // An empty ExportTraceServiceResponse: a zero-length message.
            let _ = send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), false);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let _ = send.send_trailers(trailers);
        }
        Answer::Status(code) => {
            let response = response.header("grpc-status", code.to_string()).header("grpc-message", "no%20thanks");
            let _ = respond.send_response(response.body(()).unwrap(), true);
        }
    }
}

fn exporter(endpoint: String) -> Exporter {
    let config = TraceConfig {
        endpoint,
        protocol: Protocol::Grpc,
        service_name: "test".into(),
        resource: Vec::new(),
        timeout_ms: 10_000,
        queue_spans_max: 16,
        batch_spans_max: 16,
        schedule_delay_ms: 60_000,
    };
    Exporter::start(&config, "test", SpanCounters::default()).unwrap()
}

fn one_span(e: &Exporter) {
    let now = SystemTime::now();
    e.emit(SpanBuilder::new("s", TraceId::derive(&[b"t"]), SpanId::derive(&[b"s"]), None, now, now));
    assert!(e.flush(Duration::from_secs(30)), "the flush finished");
}

fn dropped(e: &Exporter) -> u64 {
    e.counters().dropped.get_or_create(&DropLabels { reason: "export_failed" }).get()
}

#[test]
fn spans_go_as_one_unary_grpc_call_to_the_trace_service() {
    let (addr, seen) = collector(vec![Answer::Ok]);
    let e = exporter(format!("http://{addr}"));
    one_span(&e);
    one_span(&e);
    assert_eq!((e.counters().exported.get(), dropped(&e)), (2, 0));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (path, ctype, te, len) in &seen {
        assert_eq!(path, "/opentelemetry.proto.collector.trace.v1.TraceService/Export");
        assert_eq!((ctype.as_str(), te.as_str()), ("application/grpc", "trailers"));
        assert!(*len > 5, "a length-prefixed message: {seen:?}");
    }
    assert!(e.shutdown(Duration::from_secs(10)));
}

#[test]
fn an_endpoint_path_prefixes_the_method_as_tonic_does() {
    let (addr, seen) = collector(vec![Answer::Ok]);
    let e = exporter(format!("http://{addr}/otlp/"));
    one_span(&e);
    assert_eq!(seen.lock().unwrap()[0].0, "/otlp/opentelemetry.proto.collector.trace.v1.TraceService/Export");
}

#[test]
fn unavailable_is_retried_and_a_terminal_status_is_not() {
    let (addr, seen) = collector(vec![Answer::Status(14), Answer::Ok]);
    let e = exporter(format!("http://{addr}"));
    one_span(&e);
    assert_eq!((e.counters().exported.get(), dropped(&e)), (1, 0), "exported on the second call");
    assert_eq!(seen.lock().unwrap().len(), 2);

    let (addr, seen) = collector(vec![Answer::Status(3)]);
    let e = exporter(format!("http://{addr}"));
    one_span(&e);
    assert_eq!((e.counters().exported.get(), dropped(&e)), (0, 1), "INVALID_ARGUMENT drops the batch");
    assert_eq!(seen.lock().unwrap().len(), 1, "and is not retried");
}

#[test]
fn a_collector_that_is_down_loses_the_spans_counted() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = TraceConfig {
        endpoint: format!("http://{free}"),
        protocol: Protocol::Grpc,
        service_name: "test".into(),
        resource: Vec::new(),
        // The retries end within it.
        timeout_ms: 1_000,
        queue_spans_max: 16,
        batch_spans_max: 16,
        schedule_delay_ms: 60_000,
    };
    let e = Exporter::start(&config, "test", SpanCounters::default()).unwrap();
    one_span(&e);
    assert_eq!((e.counters().exported.get(), dropped(&e)), (0, 1));
}
