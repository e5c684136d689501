//! The prompt upsampler: `--input items.json --output result.json`.

use crate::argparse::{self, Kind, Opt};
use crate::torchrun::Launch;
use crate::{Env, Failure, Io, output};
use serde_json::{Value, json};
use std::path::Path;

/// Largest `--input` file.
pub(crate) const MAX_INPUT_BYTES: u64 = 16 * 1024 * 1024;
/// Most items in one `--input` file.
pub(crate) const MAX_ITEMS: usize = 10_000;

const PROG: &str = "prompt_upsampler.py";

const OPTS: &[Opt] = &[
    Opt { name: "input", kind: Kind::Str },
    Opt { name: "output", kind: Kind::Str },
    Opt { name: "checkpoint_dir", kind: Kind::Str },
];

/// What the "model" adds after the prompt, picked by the video's hash.
const SENTENCES: [&str; 8] = [
    "The scene is lit by soft, diffuse daylight with gentle shadows.",
    "The camera moves slowly forward, keeping the horizon level.",
    "Wet asphalt reflects the surrounding lights in long streaks.",
    "Dense foliage lines both sides, swaying slightly in the wind.",
    "Low golden-hour sun casts long shadows across the ground.",
    "An overcast sky gives the colors a muted, even tone.",
    "Fine details such as textures and markings stay sharp throughout.",
    "Distant buildings fade into a light atmospheric haze.",
];

/// The deterministic "upsampled" prompt: `prompt` cleaned, then a sentence and `(video <8 hex>)` from the video's SHA-256.
pub fn upsample_prompt(prompt: &str, video_sha256_hex: &str) -> String {
    let mut cleaned = prompt.split_whitespace().collect::<Vec<_>>().join(" ");
    if !cleaned.is_empty() && !cleaned.ends_with(['.', '!', '?']) {
        cleaned.push('.');
    }
    let short: String = video_sha256_hex.chars().take(8).collect();
    let index = u8::from_str_radix(video_sha256_hex.get(..2).unwrap_or("00"), 16).unwrap_or(0) as usize;
    let sentence = SENTENCES[index % SENTENCES.len()];
    let tail = format!("{sentence} (video {short})");
    if cleaned.is_empty() { tail } else { format!("{cleaned} {tail}") }
}

/// Runs the upsampler script with the launch's arguments.
pub(crate) fn main(launch: &Launch, env: &Env, io: &mut Io<'_>) -> Result<(), Failure> {
    let flags = argparse::parse(PROG, OPTS, &launch.script_args)?;
    let (Some(input), Some(output_path)) = (flags.str("input"), flags.str("output")) else {
        return Err(argparse::usage_error(PROG, OPTS, "the following arguments are required: --input, --output"));
    };
    if env.vllm_method.as_deref() != Some("spawn") {
        return Err(Failure::Python {
            kind: "RuntimeError",
            msg: "Cannot re-initialize CUDA in forked subprocess. To use CUDA with multiprocessing, you must use \
                  the 'spawn' start method: set VLLM_WORKER_MULTIPROC_METHOD=spawn"
                .into(),
        });
    }
    let bytes = output::read_limited(input, MAX_INPUT_BYTES, "upsampler input")?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| Failure::Python {
        kind: "json.decoder.JSONDecodeError",
        msg: format!("{e} (in upsampler input '{input}')"),
    })?;
    let Value::Array(items) = value else {
        return Err(Failure::value(format!("upsampler input '{input}' must be a JSON array of items")));
    };
    if items.len() > MAX_ITEMS {
        return Err(Failure::value(format!("upsampler input '{input}' has more than {MAX_ITEMS} items")));
    }
    let mut checked = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = |key: &str| -> Result<String, Failure> {
            match item.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(Failure::Python { kind: "KeyError", msg: format!("'{key}' (item {i} needs it as a string)") }),
            }
        };
        let (name, prompt, video) = (field("name")?, field("prompt")?, field("video_path")?);
        let sha = output::sha256_file(&video)?;
        checked.push((name, prompt, sha));
    }
    let checkpoints = flags.str("checkpoint_dir").unwrap_or("checkpoints");
    let _ =
        writeln!(io.out, "Loading Pixtral prompt upsampler from {checkpoints} (Cosmos stand-in: no weights are read)");
    let _ = io.out.flush();
    let steps = checked.len() as u64;
    crate::transfer::diffuse(io, env, "Processed prompts", steps.max(1), crate::transfer::step_ms(env)?)?;
    let results: Vec<Value> = checked
        .iter()
        .map(|(name, prompt, sha)| json!({"name": name, "prompt": prompt, "upsampled_prompt": upsample_prompt(prompt, sha)}))
        .collect();
    let text = serde_json::to_string_pretty(&Value::Array(results)).unwrap_or_else(|_| "[]".into());
    output::write_file(Path::new(output_path), text.as_bytes())?;
    let _ = writeln!(io.out, "Saved {} upsampled prompt(s) to {output_path}", checked.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{one_gpu, run_args};

    const SCRIPT: &str = "cosmos_transfer1/auxiliary/upsampler/inference/prompt_upsampler.py";

    #[test]
    fn upsampled_prompts_name_the_video() {
        let sha = "ab12cd34".to_string() + &"0".repeat(56);
        let up = upsample_prompt("  a  car\non a road ", &sha);
        assert!(up.starts_with("a car on a road. "), "{up}");
        assert!(up.ends_with("(video ab12cd34)"), "{up}");
        assert_eq!(up, upsample_prompt("a car on a road", &sha));
        assert_eq!(upsample_prompt("", &sha), format!("{} (video ab12cd34)", SENTENCES[0xab % 8]));
    }

    #[test]
    fn enhances_each_item_from_its_video() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n).display().to_string();
        std::fs::write(p("v.mp4"), b"video").unwrap();
        let items = json!([{"name": "one", "prompt": "a cat", "video_path": p("v.mp4")}]);
        std::fs::write(p("in.json"), items.to_string()).unwrap();
        let args = [SCRIPT, "--input", &p("in.json"), "--output", &p("res/out.json")];
        let (code, _, err) = run_args(&args, &one_gpu());
        assert_eq!(code, 1);
        assert!(err.contains("VLLM_WORKER_MULTIPROC_METHOD=spawn"), "{err}");
        let env = Env { vllm_method: Some("spawn".into()), ..one_gpu() };
        let (code, _, err) = run_args(&args, &env);
        assert_eq!(code, 0, "{err}");
        let out: Value = serde_json::from_slice(&std::fs::read(p("res/out.json")).unwrap()).unwrap();
        let sha = output::sha256_file(&p("v.mp4")).unwrap();
        assert_eq!(
            out,
            json!([{"name": "one", "prompt": "a cat", "upsampled_prompt": upsample_prompt("a cat", &sha)}])
        );
        std::fs::write(p("in.json"), json!([{"name": "x", "prompt": "p", "video_path": p("none.mp4")}]).to_string())
            .unwrap();
        let (code, _, err) = run_args(&args, &env);
        assert_eq!(code, 1);
        assert!(err.contains("FileNotFoundError"), "{err}");
    }
}
