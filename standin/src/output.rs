//! The bytes of the stand-in's `.mp4` files (layout in the crate docs).

use crate::Failure;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// The first line of every output file.
pub const OUTPUT_MAGIC: &str = "COSMOS-STANDIN-OUTPUT v1\n";
/// Payload size after the header: about what a short clip's container weighs at the smallest.
pub const OUTPUT_PAYLOAD_BYTES: usize = 64 * 1024;
/// Largest header line [`parse_output`] looks for (prompts are long, not this long).
const HEADER_BYTES_MAX: usize = 4 * 1024 * 1024;

/// The header of a transfer or upscale output. Field order is the JSON key
/// order: a struct keeps it whatever serde_json features the workspace enables.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct Header {
    /// `transfer` or `upscale`.
    pub mode: &'static str,
    /// The effective prompt (upsampled under `--upsample_prompt`).
    pub prompt: String,
    /// The effective negative prompt.
    pub negative_prompt: String,
    /// Diffusion steps.
    pub num_steps: i64,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// Largest noise level.
    pub sigma_max: f64,
    /// Sampling seed.
    pub seed: i64,
    /// Output frame rate.
    pub fps: i64,
    /// `--num_gpus`.
    pub num_gpus: i64,
    /// The effective `blur_strength` (flag, else top-level spec key, else `medium`).
    pub blur_strength: String,
    /// The effective `canny_threshold` (flag, else top-level spec key, else `medium`).
    pub canny_threshold: String,
    /// Hex SHA-256 of the input video's bytes; `None` when `input_video_path` is empty.
    pub input_video_sha256: Option<String>,
    /// Control name → its settings.
    pub controls: BTreeMap<String, ControlHeader>,
}

/// One control in a [`Header`].
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct ControlHeader {
    /// A non-negative number, or `"mask:<sha256>"` for a `.pt` weight mask.
    pub control_weight: serde_json::Value,
    /// Hex SHA-256 of the given control video; `None` when the model derives it.
    pub input_control_sha256: Option<String>,
}

/// The header of a control the model derived from the input video.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct DerivedHeader {
    /// `derived_control`.
    pub mode: &'static str,
    /// The control's name (depth or seg).
    pub control: String,
    /// Hex SHA-256 of the input video it was derived from.
    pub input_video_sha256: String,
}

/// The whole file for a header.
pub(crate) fn file_bytes<H: Serialize>(header: &H) -> Vec<u8> {
    // Serializing plain structs, strings and finite floats cannot fail; `null` keeps this panic-free regardless.
    let json = serde_json::to_string(header).unwrap_or_else(|_| "null".into());
    let mut bytes = Vec::with_capacity(OUTPUT_MAGIC.len() + json.len() + 1 + OUTPUT_PAYLOAD_BYTES);
    bytes.extend_from_slice(OUTPUT_MAGIC.as_bytes());
    bytes.extend_from_slice(json.as_bytes());
    bytes.push(b'\n');
    let seed = Sha256::digest(json.as_bytes());
    let mut counter: u64 = 0;
    while bytes.len() < OUTPUT_MAGIC.len() + json.len() + 1 + OUTPUT_PAYLOAD_BYTES {
        let block = Sha256::new().chain_update(seed).chain_update(counter.to_le_bytes()).finalize();
        bytes.extend_from_slice(&block);
        counter += 1;
    }
    bytes
}

/// The header JSON of a stand-in output file, or `None` when `bytes` is not one.
pub fn parse_output(bytes: &[u8]) -> Option<serde_json::Value> {
    let rest = bytes.strip_prefix(OUTPUT_MAGIC.as_bytes())?;
    let end = rest.iter().take(HEADER_BYTES_MAX).position(|&b| b == b'\n')?;
    let value: serde_json::Value = serde_json::from_slice(&rest[..end]).ok()?;
    value.is_object().then_some(value)
}

/// Hex SHA-256 of a file's bytes, read in pieces so big videos cost no memory.
pub(crate) fn sha256_file(path: &str) -> Result<String, Failure> {
    let mut file = std::fs::File::open(path).map_err(|e| Failure::os(path, &e))?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(Failure::Python { kind: "IsADirectoryError", msg: format!("[Errno 21] Is a directory: '{path}'") });
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Failure::os(path, &e)),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Reads a small file whole, refusing one over `max_bytes`.
pub(crate) fn read_limited(path: &str, max_bytes: u64, what: &str) -> Result<Vec<u8>, Failure> {
    let file = std::fs::File::open(path).map_err(|e| Failure::os(path, &e))?;
    let mut bytes = Vec::new();
    file.take(max_bytes + 1).read_to_end(&mut bytes).map_err(|e| Failure::os(path, &e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(Failure::value(format!("{what} '{path}' is larger than {max_bytes} bytes")));
    }
    Ok(bytes)
}

/// Writes `bytes` to `path`, creating its directory.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    let shown = path.display().to_string();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Failure::os(&dir.display().to_string(), &e))?;
    }
    std::fs::write(path, bytes).map_err(|e| Failure::os(&shown, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(seed: i64) -> Header {
        Header {
            mode: "transfer",
            prompt: "a cat".into(),
            negative_prompt: String::new(),
            num_steps: 35,
            guidance: 5.0,
            sigma_max: 70.0,
            seed,
            fps: 24,
            num_gpus: 1,
            blur_strength: "high".into(),
            canny_threshold: "medium".into(),
            input_video_sha256: Some("ab".into()),
            controls: BTreeMap::from([(
                "vis".to_string(),
                ControlHeader { control_weight: 0.25.into(), input_control_sha256: None },
            )]),
        }
    }

    #[test]
    fn output_is_deterministic_and_parses_back() {
        let a = file_bytes(&header(1));
        assert_eq!(a, file_bytes(&header(1)));
        assert_ne!(a[a.len() - 32..], file_bytes(&header(2))[a.len() - 32..], "payload depends on the header");
        let rest = &a[OUTPUT_MAGIC.len()..];
        let json_len = rest.iter().position(|&b| b == b'\n').unwrap();
        let line = std::str::from_utf8(&rest[..json_len]).unwrap();
        assert!(
            line.starts_with(
                r#"{"mode":"transfer","prompt":"a cat","negative_prompt":"","num_steps":35,"guidance":5.0,"#
            )
        );
        let v = parse_output(&a).unwrap();
        assert_eq!(v["seed"], 1);
        assert_eq!((v["blur_strength"].as_str(), v["canny_threshold"].as_str()), (Some("high"), Some("medium")));
        assert!(v["controls"]["vis"]["input_control_sha256"].is_null());
        assert_eq!(a.len(), OUTPUT_MAGIC.len() + json_len + 1 + OUTPUT_PAYLOAD_BYTES);
    }

    #[test]
    fn payload_is_sha256_in_counter_mode() {
        let a = file_bytes(&header(1));
        let json = serde_json::to_string(&header(1)).unwrap();
        let seed = Sha256::digest(json.as_bytes());
        let block1 = Sha256::new().chain_update(seed).chain_update(1u64.to_le_bytes()).finalize();
        let start = OUTPUT_MAGIC.len() + json.len() + 1 + 32;
        assert_eq!(&a[start..start + 32], block1.as_slice());
    }

    #[test]
    fn other_bytes_are_not_outputs() {
        assert!(parse_output(b"").is_none());
        assert!(parse_output(b"\x00\x00\x00\x18ftypmp42").is_none());
        assert!(parse_output(b"COSMOS-STANDIN-OUTPUT v1\nnot json\n").is_none());
        assert!(parse_output(b"COSMOS-STANDIN-OUTPUT v1\n[1]\n").is_none());
    }
}
