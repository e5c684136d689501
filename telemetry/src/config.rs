//! Trace export settings from the standard OpenTelemetry variables.
//!
//! Honoured: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as given) or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` appended over HTTP, used as
//! given over gRPC); either one turns export on.
//! `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` (`http/protobuf`, the default, or
//! `grpc`; `http/json` is refused: not built),
//! `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` (ms), `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`
//! (read by the OTLP exporter itself), `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_MAX_QUEUE_SIZE`,
//! `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`;
//! `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off.

use std::time::Duration;

/// Spans waiting for the exporter thread beyond which new ones are dropped (and counted).
/// Eight times the specification's 2,048: a batch submission makes one `submit` span per
/// job at once, and a 5,000-job batch would otherwise lose most of them with a healthy
/// collector. Bounded all the same (some 10 MiB of spans at most).
pub const QUEUE_SPANS_MAX_DEFAULT: usize = 16_384;
/// Spans in one export request.
pub const BATCH_SPANS_MAX_DEFAULT: usize = 512;
/// Longest time a span waits in the queue before its batch is sent.
pub const SCHEDULE_DELAY_MS_DEFAULT: u64 = 5_000;
/// Bound on one export request, retries included.
pub const EXPORT_TIMEOUT_MS_DEFAULT: u64 = 10_000;

/// How spans travel to the collector.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/HTTP with protobuf bodies (`http/protobuf`), to port 4318 by convention.
    HttpProtobuf,
    /// OTLP/gRPC (`grpc`), to port 4317 by convention.
    Grpc,
}

impl Protocol {
    /// The name the `OTEL_EXPORTER_OTLP_PROTOCOL` variable gives it.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::HttpProtobuf => "http/protobuf",
            Protocol::Grpc => "grpc",
        }
    }
}

/// Where and how spans are exported.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceConfig {
    /// Over HTTP the full URL spans are posted to (`…/v1/traces`); over gRPC the collector's
    /// `http://host:port` (a path, if any, prefixes the gRPC method's).
    pub endpoint: String,
    /// HTTP or gRPC.
    pub protocol: Protocol,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Resource attributes (from `OTEL_RESOURCE_ATTRIBUTES`, then the daemon's own), `service.name` aside.
    pub resource: Vec<(String, String)>,
    /// Bound on one export request.
    pub timeout_ms: u64,
    /// See [`QUEUE_SPANS_MAX_DEFAULT`].
    pub queue_spans_max: usize,
    /// See [`BATCH_SPANS_MAX_DEFAULT`].
    pub batch_spans_max: usize,
    /// See [`SCHEDULE_DELAY_MS_DEFAULT`].
    pub schedule_delay_ms: u64,
}

/// A variable asks for something this build cannot do, or is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A protocol other than http/protobuf or grpc.
    #[error(
        "{var}={value}: only http/protobuf (the default) and grpc are built into this release; unset {var} or set it \
         to one of them"
    )]
    Protocol {
        /// The variable.
        var: &'static str,
        /// What it said.
        value: String,
    },
    /// An https endpoint: this build has no TLS.
    #[error(
        "{var}={value}: this release exports over plain http only (no TLS is built in); run an OpenTelemetry \
         Collector on this host or a trusted network and point {var} at its http:// OTLP port"
    )]
    Https {
        /// The variable.
        var: &'static str,
        /// What it said.
        value: String,
    },
    /// An endpoint that is not an http URL.
    #[error("{var}={value}: not an http:// URL with a host (e.g. http://127.0.0.1:4318)")]
    Endpoint {
        /// The variable.
        var: &'static str,
        /// What it said.
        value: String,
    },
    /// A number that is not one.
    #[error("{var}={value}: not a whole number greater than 0")]
    Number {
        /// The variable.
        var: &'static str,
        /// What it said.
        value: String,
    },
}

impl TraceConfig {
    /// Reads the process's environment: `Ok(None)` when export is not configured (or turned off).
    pub fn from_env(service_default: &str, own: &[(&str, String)]) -> Result<Option<TraceConfig>, ConfigError> {
        TraceConfig::from_lookup(|k| std::env::var(k).ok(), service_default, own)
    }

    /// [`TraceConfig::from_env`] over any lookup; `own` are the daemon's resource attributes
    /// (`host.name`, say), which `OTEL_RESOURCE_ATTRIBUTES` overrides.
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
        service_default: &str,
        own: &[(&str, String)],
    ) -> Result<Option<TraceConfig>, ConfigError> {
        let get = |k: &str| get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || get("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
        {
            return Ok(None);
        }
        // The signal's own variable wins over the general one.
        let mut protocol = Protocol::HttpProtobuf;
        if let Some((var, p)) = ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]
            .into_iter()
            .find_map(|var| get(var).map(|p| (var, p)))
        {
            protocol = match p.as_str() {
                "http/protobuf" => Protocol::HttpProtobuf,
                "grpc" => Protocol::Grpc,
                _ => return Err(ConfigError::Protocol { var, value: p }),
            };
        }
        let (var, endpoint) = match (get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), get("OTEL_EXPORTER_OTLP_ENDPOINT")) {
            (Some(e), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", e),
            // gRPC names the method itself; the general endpoint is the collector's address.
            (None, Some(base)) if protocol == Protocol::Grpc => ("OTEL_EXPORTER_OTLP_ENDPOINT", base),
            (None, Some(base)) => ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("{}/v1/traces", base.trim_end_matches('/'))),
            (None, None) => return Ok(None),
        };
        let shown = get(var).unwrap_or_default();
        if endpoint.starts_with("https://") {
            return Err(ConfigError::Https { var, value: shown });
        }
        let host = endpoint.strip_prefix("http://").map(|r| r.split(['/', '?']).next().unwrap_or(""));
        if host.is_none_or(|h| h.is_empty() || h.starts_with(':')) || endpoint.parse::<http::Uri>().is_err() {
            return Err(ConfigError::Endpoint { var, value: shown });
        }
        let number = |var: &'static str, default: u64| -> Result<u64, ConfigError> {
            match get(var) {
                None => Ok(default),
                Some(v) => match v.parse::<u64>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(ConfigError::Number { var, value: v }),
                },
            }
        };
        let timeout_ms = match get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") {
            Some(_) => number("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", EXPORT_TIMEOUT_MS_DEFAULT)?,
            None => number("OTEL_EXPORTER_OTLP_TIMEOUT", EXPORT_TIMEOUT_MS_DEFAULT)?,
        };
        let queue_spans_max = number("OTEL_BSP_MAX_QUEUE_SIZE", QUEUE_SPANS_MAX_DEFAULT as u64)? as usize;
        let batch_spans_max =
            (number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", BATCH_SPANS_MAX_DEFAULT as u64)? as usize).min(queue_spans_max);
        let schedule_delay_ms = number("OTEL_BSP_SCHEDULE_DELAY", SCHEDULE_DELAY_MS_DEFAULT)?;

        // OTEL_RESOURCE_ATTRIBUTES: `k=v,k2=v2`, values percent-encoded.
        let mut resource: Vec<(String, String)> = Vec::new();
        let mut service_name = None;
        for pair in get("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default().split(',') {
            let Some((k, v)) = pair.split_once('=') else { continue };
            let (k, v) = (k.trim(), percent_decode(v.trim()));
            if k.is_empty() {
                continue;
            }
            if k == "service.name" {
                service_name = Some(v);
            } else {
                resource.push((k.to_string(), v));
            }
        }
        for (k, v) in own {
            if !resource.iter().any(|(rk, _)| rk == k) {
                resource.push((k.to_string(), v.clone()));
            }
        }
        let service_name = get("OTEL_SERVICE_NAME").or(service_name).unwrap_or_else(|| service_default.to_string());
        Ok(Some(TraceConfig {
            endpoint,
            protocol,
            service_name,
            resource,
            timeout_ms,
            queue_spans_max,
            batch_spans_max,
            schedule_delay_ms,
        }))
    }

    /// Bound on one export request.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Option<TraceConfig>, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        TraceConfig::from_lookup(|k| map.get(k).cloned(), "cosmos-controller", &[("host.name", "h1".into())])
    }

    #[test]
    fn off_unless_an_endpoint_is_set() {
        assert_eq!(config(&[]), Ok(None));
        assert_eq!(config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]), Ok(None));
        assert_eq!(
            config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), ("OTEL_SDK_DISABLED", "true")]),
            Ok(None)
        );
        assert_eq!(
            config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), ("OTEL_TRACES_EXPORTER", "none")]),
            Ok(None)
        );
    }

    #[test]
    fn the_endpoint_follows_the_specification() {
        let c = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]).unwrap().unwrap();
        assert_eq!(c.endpoint, "http://c:4318/v1/traces");
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:9999/custom"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://t:9999/custom", "the signal's own variable is used as given");
        assert_eq!((c.timeout_ms, c.queue_spans_max, c.service_name.as_str()), (10_000, 16_384, "cosmos-controller"));
    }

    #[test]
    fn grpc_is_chosen_by_either_protocol_variable_and_takes_the_endpoint_as_given() {
        let c = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])
            .unwrap()
            .unwrap();
        assert_eq!((c.protocol, c.endpoint.as_str()), (Protocol::Grpc, "http://c:4317"), "no /v1/traces over gRPC");
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.protocol, Protocol::HttpProtobuf, "the traces variable wins over the general one");
        assert_eq!(c.endpoint, "http://c:4318/v1/traces");
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((c.protocol, c.endpoint.as_str()), (Protocol::Grpc, "http://t:4317"));
        let c = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]).unwrap().unwrap();
        assert_eq!(c.protocol, Protocol::HttpProtobuf, "http/protobuf by default");
    }

    #[test]
    fn json_https_and_bad_values_are_refused_saying_what_to_do() {
        let json = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
        ]);
        let Err(e @ ConfigError::Protocol { var: "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", .. }) = json else {
            panic!("{json:?}")
        };
        assert!(e.to_string().contains("http/protobuf") && e.to_string().contains("grpc"), "{e}");
        let https = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")]).unwrap_err().to_string();
        assert!(https.contains("no TLS"), "{https}");
        for bad in ["c:4318", "http://", "http://:4318"] {
            assert!(
                matches!(config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", bad)]), Err(ConfigError::Endpoint { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), ("OTEL_BSP_MAX_QUEUE_SIZE", "0")]),
            Err(ConfigError::Number { var: "OTEL_BSP_MAX_QUEUE_SIZE", .. })
        ));
    }

    #[test]
    fn service_name_and_resource_attributes_follow_their_precedence() {
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let c = config(&[
            base,
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs,deployment.environment=prod%20eu,host.name=override"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.service_name, "from-attrs");
        assert!(c.resource.contains(&("deployment.environment".into(), "prod eu".into())), "{:?}", c.resource);
        assert!(c.resource.contains(&("host.name".into(), "override".into())), "the operator's value wins");
        assert!(!c.resource.contains(&("host.name".into(), "h1".into())));
        let c = config(&[base, ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs"), ("OTEL_SERVICE_NAME", "svc")])
            .unwrap()
            .unwrap();
        assert_eq!(c.service_name, "svc", "OTEL_SERVICE_NAME wins");
        assert!(c.resource.contains(&("host.name".into(), "h1".into())));
    }
}
