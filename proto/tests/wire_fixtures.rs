//! Golden bytes of the wire format.
//!
//! bincode is not self-describing: a variant is sent as its index and a struct
//! as its fields in declaration order, so reordering an enum's variants or a
//! struct's fields compiles, passes every round-trip test, and yet makes this
//! build misread a peer of the same `PROTOCOL_VERSION`. This test pins the
//! encoding: one example of every variant of every enum that crosses the wire
//! (the top-level messages framed exactly as sent, the enums nested in them as
//! their bare encoding) is kept as hex under
//! `tests/fixtures/wire/v<PROTOCOL_VERSION>/`, and each example must encode to
//! its fixture's bytes and each fixture must decode to its example.
//!
//! A wire change is blessed by bumping `PROTOCOL_VERSION` and writing the new
//! version's fixtures: `COSMOS_BLESS_FIXTURES=1 cargo test -p cosmos-proto --test
//! wire_fixtures` creates the directory of the current version when it does not
//! exist, and refuses to touch one that does (the fixtures of a released
//! version never change). While a new version is unreleased, delete its
//! directory and bless again after each further change.

use bytes::BytesMut;
use cosmos_proto::frame::{FRAME_BYTES_MAX_DEFAULT, encode_frame};
use cosmos_proto::handshake::{self, Hello, HelloReply, Refusal, Role, Token};
use cosmos_proto::spec::{ArtifactRef, InputArtifact, JobSpec, Mount, OutputArtifact};
use cosmos_proto::*;
use serde::de::DeserializeOwned;
use serde::{Deserializer, Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::{Path, PathBuf};

/// Set to `1` to write the fixtures of a new protocol version.
const BLESS_VAR: &str = "COSMOS_BLESS_FIXTURES";
/// The command that writes fixtures, quoted in failure messages.
const BLESS_COMMAND: &str = "COSMOS_BLESS_FIXTURES=1 cargo test -p cosmos-proto --test wire_fixtures";
/// Bytes per line of a fixture file, so a diff points near the change.
const HEX_LINE_BYTES: usize = 32;

#[test]
fn every_wire_message_encodes_to_its_fixture_and_back() {
    let examples = examples();
    check_every_variant_has_an_example(&examples);

    let dir = fixture_dir();
    let bless = std::env::var(BLESS_VAR).is_ok_and(|v| v == "1");
    if bless && !dir.exists() {
        write_fixtures(&dir, &examples.list);
        return;
    }
    let problems = compare_with_fixtures(&dir, &examples.list);
    if problems.is_empty() {
        return;
    }
    let mut report = format!(
        "the wire encoding of this build differs from the fixtures of protocol v{PROTOCOL_VERSION} in {}:\n",
        dir.display()
    );
    for problem in &problems {
        report.push_str(&format!("  - {problem}\n"));
    }
    report.push_str(&format!(
        "\nbincode sends variant indices and fields in declaration order, so this build would misread a peer \
         that claims the same PROTOCOL_VERSION. If the change is meant, bump PROTOCOL_VERSION in proto/src/lib.rs \
         (say what changed in its doc comment), run `{BLESS_COMMAND}` to write the new version's fixtures, delete the \
         old version's directory and commit the new one. If it is not meant, undo the reordering or retyping that \
         caused it (a new variant goes last, but still needs the bump).\n"
    ));
    if bless {
        report.push_str(&format!(
            "\n{BLESS_VAR}=1 does not rewrite the fixtures of v{PROTOCOL_VERSION}: they exist, and a released \
             version's fixtures never change. Bump PROTOCOL_VERSION first (or, if v{PROTOCOL_VERSION} is not yet \
             released, delete its directory and bless again).\n"
        ));
    }
    panic!("{report}");
}

/// The hand-written chunk encoders (they name their variant's index in code,
/// to avoid a copy of the data) write the same bytes as the derived encoding.
#[test]
fn borrowed_chunk_encoders_write_the_fixture_bytes() {
    let chunk = example_chunk();
    let mut up = Vec::new();
    encode_agent_chunk_into(chunk.sha256, chunk.offset, &chunk.data, &mut up).unwrap();
    assert_eq!(hex_lines(&framed(up)), read_fixture_text("AgentBlob.Chunk"), "AgentBlob.Chunk");
    let mut down = Vec::new();
    encode_controller_chunk_into(chunk.sha256, chunk.offset, &chunk.data, &mut down).unwrap();
    assert_eq!(hex_lines(&framed(down)), read_fixture_text("ControllerBlob.Chunk"), "ControllerBlob.Chunk");
}

// ---- the examples ----
//
// Values are chosen so that swapping any two fields changes the bytes: no two
// fields of one struct hold the same value, and strings say which field they are.

fn examples() -> Examples {
    let mut ex = Examples::default();

    for msg in [
        AgentMsg::Hello(AgentHello {
            gpus: vec![GpuInfo {
                index: 3,
                uuid: "GPU-0000aaaa".into(),
                name: "NVIDIA H100 80GB HBM3".into(),
                total_vram_bytes: 85_520_809_984,
            }],
            gpus_simulated: true,
            runtime: "docker".into(),
            attempts: vec![AttemptReport {
                attempt_id: AttemptId(41),
                phase: AttemptPhase::Running { step: 7, total: 9 },
                gpu_uuids: vec!["GPU-0000aaaa".into()],
            }],
            incarnation: 0x0102_0304_0506_0708,
        }),
        AgentMsg::Heartbeat(Heartbeat {
            seq: 12,
            gpus: vec![GpuUsage {
                uuid: "GPU-0000bbbb".into(),
                used_vram_bytes: 1_000,
                free_vram_bytes: 2_000_000,
                foreign_vram_bytes: 300,
                utilization_pct: Some(55),
                temperature_c: Some(-4),
                healthy: false,
                quarantine: Some(GpuQuarantine {
                    reason: "memory held after attempt att-7 ended".into(),
                    held_bytes: 4_096,
                    pids: vec![4_321, 8_765],
                    for_ms: 61_000,
                }),
            }],
            attempts: vec![AttemptReport {
                attempt_id: AttemptId(42),
                phase: AttemptPhase::Starting,
                gpu_uuids: vec!["GPU-0000bbbb".into(), "GPU-0000cccc".into()],
            }],
            unhealthy: Some("docker does not answer".into()),
        }),
        AgentMsg::AttemptStarted { attempt_id: AttemptId(43), handle: "container-9f".into() },
        AgentMsg::Progress { attempt_id: AttemptId(44), step: 5, total: 600 },
        AgentMsg::LogChunk(LogChunk {
            attempt_id: AttemptId(45),
            stream: LogStream::Stderr,
            offset: 70_000,
            data: b"step 5/600\n".to_vec(),
        }),
        AgentMsg::AttemptFinished {
            attempt_id: AttemptId(46),
            outcome: AttemptOutcome::Succeeded {
                outputs: vec![ArtifactRef {
                    path: "out/video.mp4".into(),
                    sha256: Sha256([0x5a; 32]),
                    size_bytes: 4096,
                }],
            },
        },
        AgentMsg::GpuFault {
            gpu_uuid: "GPU-0000dddd".into(),
            fault: GpuFault::Hardware { detail: "XID 79: fallen off the bus".into() },
        },
        AgentMsg::GpuRecovered { gpu_uuid: "GPU-0000eeee".into() },
    ] {
        ex.variant(
            msg,
            |m| framed(codec::encode(m).unwrap()),
            |b| match AgentFrame::decode(&unframe(b)?) {
                Ok(AgentFrame::Msg(m)) => Ok(m),
                other => Err(format!("decodes as {other:?}")),
            },
        );
    }

    for msg in [
        ControllerMsg::Welcome { epoch: Epoch(8), heartbeat_interval_ms: 2_500 },
        ControllerMsg::Assign(Box::new(Assign {
            epoch: Epoch(9),
            attempt_id: AttemptId(47),
            job_id: JobId(17),
            spec: example_spec(),
            gpu_uuids: vec!["GPU-0000ffff".into()],
            trace: TraceContext {
                traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                tracestate: "vendor=value".into(),
            },
        })),
        ControllerMsg::Cancel { attempt_id: AttemptId(48), grace_ms: 30_000 },
        ControllerMsg::Drain { draining: true },
        ControllerMsg::Reconcile { epoch: Epoch(10), keep: vec![AttemptId(49), AttemptId(50)] },
        ControllerMsg::AckFinished { attempt_ids: vec![AttemptId(51), AttemptId(52), AttemptId(53)] },
        ControllerMsg::HeartbeatAck { seq: 13 },
        ControllerMsg::ReleaseGpu { gpu_uuid: "GPU-0000dddd".into() },
    ] {
        ex.variant(
            msg,
            |m| framed(codec::encode(m).unwrap()),
            |b| match ControllerFrame::decode(&unframe(b)?) {
                Ok(ControllerFrame::Msg(m)) => Ok(m),
                other => Err(format!("decodes as {other:?}")),
            },
        );
    }

    let sha = Sha256(*b"0123456789abcdef0123456789ABCDEF");
    for blob in [
        AgentBlob::Request { sha256: sha, offset: 1_048_576, len_bytes: 65_536 },
        AgentBlob::Offer { sha256: sha, size_bytes: 3_000_000 },
        AgentBlob::Chunk(example_chunk()),
    ] {
        ex.variant(
            blob,
            |b| framed(encode_blob(b).unwrap()),
            |b| match AgentFrame::decode(&unframe(b)?) {
                Ok(AgentFrame::Blob(blob)) => Ok(blob),
                other => Err(format!("decodes as {other:?}")),
            },
        );
    }

    for blob in [
        ControllerBlob::Chunk(example_chunk()),
        ControllerBlob::Missing { sha256: sha, reason: "not in the blob store".into() },
        ControllerBlob::Resume { sha256: sha, have_bytes: 2_097_152 },
        ControllerBlob::Ack { sha256: sha, have_bytes: 3_145_728 },
        ControllerBlob::Stored { sha256: sha },
        ControllerBlob::Refused {
            sha256: sha,
            reason: "content does not match its digest".into(),
            retry: crate::Retry::Retryable,
        },
    ] {
        ex.variant(
            blob,
            |b| framed(encode_blob(b).unwrap()),
            |b| match ControllerFrame::decode(&unframe(b)?) {
                Ok(ControllerFrame::Blob(blob)) => Ok(blob),
                other => Err(format!("decodes as {other:?}")),
            },
        );
    }

    // The handshake: magic, version, body, in one frame each way.
    ex.named(
        "Hello",
        Hello { role: Role::Agent, node_id: "gpu-host-01".into(), token: Token("t".repeat(64)), incarnation: 77 },
        |h| framed(handshake::encode_payload(h).unwrap()),
        |b| handshake::decode_payload(&unframe(b)?).map_err(|e| e.to_string()),
    );
    for reply in [
        HelloReply::Accepted { node_id: "controller-a".into() },
        HelloReply::Refused(Refusal::NameInUse { name: "gpu-host-02".into(), holder: "10.0.0.7:51234".into() }),
    ] {
        ex.variant(
            reply,
            |r| framed(handshake::encode_payload(r).unwrap()),
            |b| handshake::decode_payload(&unframe(b)?).map_err(|e| e.to_string()),
        );
    }

    // Enums nested in the messages above, every variant, as the bytes they
    // contribute wherever they are embedded (bincode concatenates fields).
    for phase in [
        AttemptPhase::Starting,
        AttemptPhase::Running { step: 11, total: 12 },
        AttemptPhase::Stopping,
        AttemptPhase::Finished(AttemptOutcome::Cancelled),
    ] {
        ex.bare(phase);
    }
    for outcome in [
        AttemptOutcome::Succeeded {
            outputs: vec![ArtifactRef { path: "result.json".into(), sha256: Sha256([0xc3; 32]), size_bytes: 12 }],
        },
        AttemptOutcome::Failed {
            exit_code: Some(137),
            reason: "killed: out of memory".into(),
            retry: crate::Retry::Retryable,
        },
        AttemptOutcome::Cancelled,
        AttemptOutcome::Rejected { reason: "stale epoch".into() },
        AttemptOutcome::Lost { reason: "container vanished".into() },
    ] {
        ex.bare(outcome);
    }
    for fault in [
        GpuFault::VramNotReleased { attempt_id: AttemptId(54), baseline_bytes: 512, held_bytes: 8_192 },
        GpuFault::Hardware { detail: "ECC error".into() },
    ] {
        ex.bare(fault);
    }
    for stream in [LogStream::Stdout, LogStream::Stderr] {
        ex.bare(stream);
    }
    for role in [Role::Agent, Role::Controller] {
        ex.bare(role);
    }
    for refusal in [
        Refusal::VersionMismatch { controller: 3, agent: 2 },
        Refusal::BadToken,
        Refusal::WrongRole { expected: Role::Agent, got: Role::Controller },
        Refusal::BadNodeId("bad id".into()),
        Refusal::Other("shutting down".into()),
        Refusal::NameInUse { name: "gpu-host-03".into(), holder: "10.0.0.8:40000".into() },
    ] {
        ex.bare(refusal);
    }

    // Every enum reachable from a message, with all of its variants (read
    // from serde, so a variant added later is noticed here).
    ex.expect_all::<AgentMsg>();
    ex.expect_all::<ControllerMsg>();
    ex.expect_all::<AgentBlob>();
    ex.expect_all::<ControllerBlob>();
    ex.expect_all::<HelloReply>();
    ex.expect_all::<AttemptPhase>();
    ex.expect_all::<AttemptOutcome>();
    ex.expect_all::<GpuFault>();
    ex.expect_all::<LogStream>();
    ex.expect_all::<Role>();
    ex.expect_all::<Refusal>();
    ex
}

/// A spec with every field set, each to a value of its own.
fn example_spec() -> JobSpec {
    JobSpec {
        name: "render-shot-12".into(),
        image: Some("nvcr.io/cosmos/transfer:1.2".into()),
        command: vec!["python".into(), "infer.py".into(), "--steps=35".into()],
        env: BTreeMap::from([("HF_HOME".into(), "/cache/hf".into()), ("SEED".into(), "17".into())]),
        mounts: vec![Mount { volume: "checkpoints".into(), target: "/ckpt".into(), read_only: true }],
        inputs: vec![InputArtifact { sha256: Sha256([0x1e; 32]), size_bytes: 9_999, path: "in/prompt.json".into() }],
        outputs: vec![OutputArtifact { path: "out/video.mp4".into(), required: true }],
        gpus: 2,
        min_free_vram_bytes: 40_000_000_000,
        timeout_ms: 3_600_000,
        max_attempts: 4,
        priority: -5,
        shm_bytes: Some(8_589_934_592),
        ipc_host: false,
        workdir: Some("/workspace".into()),
        labels: BTreeMap::from([("team".into(), "world-models".into())]),
        terminal_exit_codes: vec![2, 64],
    }
}

fn example_chunk() -> BlobChunk {
    BlobChunk::new(Sha256(*b"fedcba9876543210FEDCBA9876543210"), 2_097_152, b"chunk bytes".to_vec())
}

// ---- the machinery ----

/// One example and what it puts on the wire.
struct Example {
    /// Fixture name: `Enum.Variant`, or the type's name for a struct.
    name: String,
    /// The bytes this build encodes the example to.
    wire: Vec<u8>,
    /// Decodes bytes and says whether they are the example.
    decodes_to_example: Box<dyn Fn(&[u8]) -> Result<(), String>>,
}

#[derive(Default)]
struct Examples {
    list: Vec<Example>,
    /// Variants with an example, by enum.
    covered: BTreeMap<&'static str, BTreeSet<&'static str>>,
    /// Every variant of every enum that must have one, by enum.
    expected: BTreeMap<&'static str, &'static [&'static str]>,
}

impl Examples {
    /// An example named after its variant.
    fn variant<T: Serialize + PartialEq + Debug + 'static>(
        &mut self,
        value: T,
        encode: impl Fn(&T) -> Vec<u8>,
        decode: impl Fn(&[u8]) -> Result<T, String> + 'static,
    ) {
        let (ty, variant) = variant_of(&value);
        let newly = self.covered.entry(ty).or_default().insert(variant);
        assert!(newly, "two examples of {ty}::{variant}: keep one, so each fixture has one meaning");
        self.named(&format!("{ty}.{variant}"), value, encode, decode);
    }

    /// An enum nested in messages, as its bare encoding.
    fn bare<T: Serialize + DeserializeOwned + PartialEq + Debug + 'static>(&mut self, value: T) {
        self.variant(value, |v| codec::encode(v).unwrap(), |b| codec::decode(b).map_err(|e| e.to_string()));
    }

    fn named<T: Serialize + PartialEq + Debug + 'static>(
        &mut self,
        name: &str,
        value: T,
        encode: impl Fn(&T) -> Vec<u8>,
        decode: impl Fn(&[u8]) -> Result<T, String> + 'static,
    ) {
        let wire = encode(&value);
        let decodes_to_example = Box::new(move |bytes: &[u8]| match decode(bytes) {
            Ok(decoded) if decoded == value => Ok(()),
            Ok(decoded) => Err(format!("decodes to {decoded:?}, expected {value:?}")),
            Err(e) => Err(format!("does not decode: {e}")),
        });
        self.list.push(Example { name: name.to_string(), wire, decodes_to_example });
    }

    /// Requires an example of every variant of `T`.
    fn expect_all<T: DeserializeOwned>(&mut self) {
        let (name, variants) = variants_of::<T>();
        self.expected.insert(name, variants);
    }
}

fn check_every_variant_has_an_example(examples: &Examples) {
    let mut missing = Vec::new();
    for (ty, variants) in &examples.expected {
        let covered = examples.covered.get(ty);
        for variant in *variants {
            if !covered.is_some_and(|c| c.contains(variant)) {
                missing.push(format!("{ty}::{variant}"));
            }
        }
    }
    for ty in examples.covered.keys() {
        if !examples.expected.contains_key(ty) {
            missing.push(format!("expect_all::<{ty}>() (the enum is not checked for completeness)"));
        }
    }
    assert!(
        missing.is_empty(),
        "no wire fixture example for: {}. Add one to examples() in proto/tests/wire_fixtures.rs; a new variant \
         changes the wire format, so bump PROTOCOL_VERSION and run `{BLESS_COMMAND}`",
        missing.join(", ")
    );
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wire").join(format!("v{PROTOCOL_VERSION}"))
}

fn fixture_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.hex"))
}

fn read_fixture_text(name: &str) -> String {
    let path = fixture_path(&fixture_dir(), name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write_fixtures(dir: &Path, examples: &[Example]) {
    std::fs::create_dir_all(dir).unwrap();
    for example in examples {
        std::fs::write(fixture_path(dir, &example.name), hex_lines(&example.wire)).unwrap();
    }
    eprintln!("wrote {} wire fixtures for protocol v{PROTOCOL_VERSION} to {}", examples.len(), dir.display());
}

/// Every difference between the examples and the fixtures on disk, in words.
fn compare_with_fixtures(dir: &Path, examples: &[Example]) -> Vec<String> {
    let mut problems = Vec::new();
    if !dir.is_dir() {
        problems.push(format!("there are no fixtures for v{PROTOCOL_VERSION} (was PROTOCOL_VERSION bumped?)"));
        return problems;
    }
    for example in examples {
        let path = fixture_path(dir, &example.name);
        let Ok(text) = std::fs::read_to_string(&path) else {
            problems.push(format!("{}: no fixture (a new variant or message?)", example.name));
            continue;
        };
        let fixture = match parse_hex(&text) {
            Ok(bytes) => bytes,
            Err(e) => {
                problems.push(format!("{}: the fixture is not hex: {e}", example.name));
                continue;
            }
        };
        if fixture != example.wire {
            problems.push(format!(
                "{}: encodes differently from its fixture from byte {} on\n      fixture:    {}\n      this build: {}",
                example.name,
                first_difference(&fixture, &example.wire),
                hex::encode(&fixture),
                hex::encode(&example.wire)
            ));
        }
        if let Err(e) = (example.decodes_to_example)(&fixture) {
            problems.push(format!("{}: the fixture {e}", example.name));
        }
    }
    let known: BTreeSet<String> = examples.iter().map(|e| format!("{}.hex", e.name)).collect();
    for entry in std::fs::read_dir(dir).unwrap() {
        let file = entry.unwrap().file_name().to_string_lossy().into_owned();
        if !known.contains(&file) {
            problems.push(format!("{file}: a fixture with no example (a variant removed or renamed?)"));
        }
    }
    problems
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()))
}

fn hex_lines(bytes: &[u8]) -> String {
    bytes.chunks(HEX_LINE_BYTES).map(|line| hex::encode(line) + "\n").collect()
}

fn parse_hex(text: &str) -> Result<Vec<u8>, hex::FromHexError> {
    hex::decode(text.split_whitespace().collect::<String>())
}

/// A payload as one frame, header included: the bytes a writer puts on the socket.
fn framed(payload: Vec<u8>) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_frame(&payload, FRAME_BYTES_MAX_DEFAULT, &mut out).unwrap();
    out.to_vec()
}

/// The payload of exactly one frame, through the decoder a reader uses.
fn unframe(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut buf = BytesMut::from(bytes);
    match FrameDecoder::default().decode_eof(&mut buf) {
        Ok(Some(payload)) if buf.is_empty() => Ok(payload.to_vec()),
        Ok(Some(_)) => Err(format!("holds {} bytes after its frame", buf.len())),
        Ok(None) => Err("holds no frame".into()),
        Err(e) => Err(format!("is not a frame: {e}")),
    }
}

// ---- serde introspection: names of variants, without a format ----

/// Enum and variant names of an enum value, as serde sees them.
fn variant_of<T: Serialize>(value: &T) -> (&'static str, &'static str) {
    value.serialize(VariantName).unwrap_or_else(|e| panic!("{e}"))
}

/// Every variant of enum `T`, from its derived `Deserialize`.
fn variants_of<T: DeserializeOwned>() -> (&'static str, &'static [&'static str]) {
    match T::deserialize(VariantList) {
        Err(Probe::Variants(name, variants)) => (name, variants),
        Err(Probe::Other(e)) => panic!("{} is not an enum: {e}", std::any::type_name::<T>()),
        Ok(_) => unreachable!("the probe never yields a value"),
    }
}

/// What the probes report; a probe reports through its error, having no data to give.
#[derive(Debug)]
enum Probe {
    Variants(&'static str, &'static [&'static str]),
    Other(String),
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for Probe {}

impl serde::de::Error for Probe {
    fn custom<M: std::fmt::Display>(msg: M) -> Self {
        Probe::Other(msg.to_string())
    }
}

impl serde::ser::Error for Probe {
    fn custom<M: std::fmt::Display>(msg: M) -> Self {
        Probe::Other(msg.to_string())
    }
}

/// A deserializer that, asked for an enum, reports the variants it was told of.
struct VariantList;

impl<'de> Deserializer<'de> for VariantList {
    type Error = Probe;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Probe> {
        Err(Probe::Other("asked for something other than an enum".into()))
    }

    fn deserialize_enum<V: serde::de::Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Probe> {
        Err(Probe::Variants(name, variants))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

/// A serializer that yields an enum value's enum and variant names and looks no deeper.
struct VariantName;

/// Swallows the fields of a tuple or struct variant.
struct SkipFields((&'static str, &'static str));

type Names = (&'static str, &'static str);
type NotAnEnum = serde::ser::Impossible<Names, Probe>;

fn not_an_enum<T>() -> Result<T, Probe> {
    Err(Probe::Other("not an enum value".into()))
}

impl Serializer for VariantName {
    type Ok = Names;
    type Error = Probe;
    type SerializeSeq = NotAnEnum;
    type SerializeTuple = NotAnEnum;
    type SerializeTupleStruct = NotAnEnum;
    type SerializeTupleVariant = SkipFields;
    type SerializeMap = NotAnEnum;
    type SerializeStruct = NotAnEnum;
    type SerializeStructVariant = SkipFields;

    fn serialize_unit_variant(self, name: &'static str, _: u32, variant: &'static str) -> Result<Names, Probe> {
        Ok((name, variant))
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        _: u32,
        variant: &'static str,
        _: &T,
    ) -> Result<Names, Probe> {
        Ok((name, variant))
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<SkipFields, Probe> {
        Ok(SkipFields((name, variant)))
    }
    fn serialize_struct_variant(
        self,
        name: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<SkipFields, Probe> {
        Ok(SkipFields((name, variant)))
    }

    fn serialize_bool(self, _: bool) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_i8(self, _: i8) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_i16(self, _: i16) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_i32(self, _: i32) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_i64(self, _: i64) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_u8(self, _: u8) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_u16(self, _: u16) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_u32(self, _: u32) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_u64(self, _: u64) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_f32(self, _: f32) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_f64(self, _: f64) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_char(self, _: char) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_str(self, _: &str) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_none(self) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_unit(self) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, _: &T) -> Result<Names, Probe> {
        not_an_enum()
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<NotAnEnum, Probe> {
        not_an_enum()
    }
    fn serialize_tuple(self, _: usize) -> Result<NotAnEnum, Probe> {
        not_an_enum()
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<NotAnEnum, Probe> {
        not_an_enum()
    }
    fn serialize_map(self, _: Option<usize>) -> Result<NotAnEnum, Probe> {
        not_an_enum()
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<NotAnEnum, Probe> {
        not_an_enum()
    }
}

impl serde::ser::SerializeTupleVariant for SkipFields {
    type Ok = Names;
    type Error = Probe;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &T) -> Result<(), Probe> {
        Ok(())
    }
    fn end(self) -> Result<Names, Probe> {
        Ok(self.0)
    }
}

impl serde::ser::SerializeStructVariant for SkipFields {
    type Ok = Names;
    type Error = Probe;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, _: &T) -> Result<(), Probe> {
        Ok(())
    }
    fn end(self) -> Result<Names, Probe> {
        Ok(self.0)
    }
}
