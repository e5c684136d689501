//! Trace and span ids, and the W3C `traceparent` header that carries them.
//!
//! The controller derives every id of a job's trace from its store's id and
//! the job's own ids (sha256, truncated), so a controller that restarts goes
//! on with the same trace, and a span whose end it only learns later (an
//! attempt's) can be named as a parent before it is exported.

use sha2::{Digest, Sha256};

/// A 16-byte trace id; never all zeros.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id; never all zeros.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    /// The id derived from `parts` (the store's id and the job's, say).
    pub fn derive(parts: &[&[u8]]) -> TraceId {
        let d = digest(b"cosmos-trace", parts);
        let mut id = [0u8; 16];
        id.copy_from_slice(&d[..16]);
        if id == [0; 16] {
            id[15] = 1;
        }
        TraceId(id)
    }

    /// The OpenTelemetry form.
    pub fn otel(self) -> opentelemetry::trace::TraceId {
        opentelemetry::trace::TraceId::from_bytes(self.0)
    }
}

impl SpanId {
    /// The id derived from `parts` (the store's id, the kind of span and its attempt, say).
    pub fn derive(parts: &[&[u8]]) -> SpanId {
        let d = digest(b"cosmos-span", parts);
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        if id == [0; 8] {
            id[7] = 1;
        }
        SpanId(id)
    }

    /// A random id, for spans nobody needs to name in advance (the agent's).
    pub fn random() -> SpanId {
        use opentelemetry_sdk::trace::IdGenerator;
        SpanId(opentelemetry_sdk::trace::RandomIdGenerator::default().new_span_id().to_bytes())
    }

    /// The OpenTelemetry form.
    pub fn otel(self) -> opentelemetry::trace::SpanId {
        opentelemetry::trace::SpanId::from_bytes(self.0)
    }
}

impl std::fmt::Display for TraceId {
    /// 32 lowercase hex digits, as in `traceparent` and OTLP/JSON.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl std::fmt::Display for SpanId {
    /// 16 lowercase hex digits.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

fn digest(domain: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(domain);
    for p in parts {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// A parsed W3C `traceparent`: which trace, and which span is the parent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Traceparent {
    /// The trace.
    pub trace_id: TraceId,
    /// The span the receiver's spans are children of.
    pub parent_id: SpanId,
    /// The `sampled` flag.
    pub sampled: bool,
}

impl Traceparent {
    /// The header value, version 00: `00-<trace>-<span>-<flags>`.
    pub fn header(&self) -> String {
        format!("00-{}-{}-{:02x}", hex(&self.trace_id.0), hex(&self.parent_id.0), u8::from(self.sampled))
    }

    /// Parses a header value as the W3C recommendation says: version 00
    /// exactly, or a later version's first four fields; `None` for anything
    /// else, all-zero ids included (the receiver then starts no child spans).
    pub fn parse(s: &str) -> Option<Traceparent> {
        let mut fields = s.trim().split('-');
        let version = fields.next()?;
        let trace = fields.next()?;
        let span = fields.next()?;
        let flags = fields.next()?;
        if version.len() != 2 || version == "ff" || (version == "00" && fields.next().is_some()) {
            return None;
        }
        let trace_id: [u8; 16] = unhex(trace)?;
        let parent_id: [u8; 8] = unhex(span)?;
        let [flags]: [u8; 1] = unhex(flags)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Traceparent { trace_id: TraceId(trace_id), parent_id: SpanId(parent_id), sampled: flags & 1 == 1 })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_bad_ones_are_refused() {
        let tp = Traceparent {
            trace_id: TraceId::derive(&[b"store", b"7"]),
            parent_id: SpanId::derive(&[b"store", b"attempt", b"9"]),
            sampled: true,
        };
        let h = tp.header();
        assert_eq!(h.len(), 55, "{h}");
        assert_eq!(Traceparent::parse(&h), Some(tp));
        // The W3C specification's example.
        let w3c = Traceparent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        assert_eq!(w3c.parent_id.0, [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31]);
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        ] {
            assert_eq!(Traceparent::parse(bad), None, "{bad}");
        }
        // A later version may add fields after the four it shares with 00.
        assert!(Traceparent::parse("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more").is_some());
    }

    #[test]
    fn derived_ids_depend_on_every_part_and_its_boundaries() {
        assert_eq!(TraceId::derive(&[b"s", b"1"]), TraceId::derive(&[b"s", b"1"]));
        assert_ne!(TraceId::derive(&[b"s", b"1"]), TraceId::derive(&[b"s", b"2"]));
        assert_ne!(SpanId::derive(&[b"ab", b"c"]), SpanId::derive(&[b"a", b"bc"]));
        assert_ne!(SpanId::random(), SpanId::random());
    }
}
