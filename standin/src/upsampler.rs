//! The prompt upsampler, as cosmos-transfer1's
//! `cosmos_transfer1/auxiliary/upsampler/inference/upsampler_pipeline.py` is:
//! `--prompt TEXT --input_video PATH [--checkpoint_dir DIR]
//! [--offload_prompt_upsampler]`, run under torchrun (it reads `RANK` and
//! friends, which torchrun sets), printing its one result on stdout as
//! `Upsampled prompt: <text>` (Python's `print("Upsampled prompt:", text)`);
//! it writes no file.

use crate::argparse::{self, Kind, Opt};
use crate::torchrun::Launch;
use crate::{Env, Failure, Io, output};

const PROG: &str = "upsampler_pipeline.py";

const OPTS: &[Opt] = &[
    Opt { name: "prompt", kind: Kind::Str },
    Opt { name: "input_video", kind: Kind::Str },
    Opt { name: "checkpoint_dir", kind: Kind::Str },
    Opt { name: "offload_prompt_upsampler", kind: Kind::Flag },
];

/// What `PixtralPromptUpsampler` asks when the prompt is empty or absent.
const NO_PROMPT: &str = "describe the following images";

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

/// The deterministic "upsampled" prompt: `prompt` cleaned, then a sentence and `(video <8 hex>)` from the
/// video's SHA-256 (`(no video frames)` when the hash is empty: no video could be read).
pub fn upsample_prompt(prompt: &str, video_sha256_hex: &str) -> String {
    let mut cleaned = prompt.split_whitespace().collect::<Vec<_>>().join(" ");
    if !cleaned.is_empty() && !cleaned.ends_with(['.', '!', '?']) {
        cleaned.push('.');
    }
    let short: String = video_sha256_hex.chars().take(8).collect();
    let index = u8::from_str_radix(video_sha256_hex.get(..2).unwrap_or("00"), 16).unwrap_or(0) as usize;
    let sentence = SENTENCES[index % SENTENCES.len()];
    let tail =
        if short.is_empty() { format!("{sentence} (no video frames)") } else { format!("{sentence} (video {short})") };
    if cleaned.is_empty() { tail } else { format!("{cleaned} {tail}") }
}

/// Runs the upsampler script with the launch's arguments.
pub(crate) fn main(launch: &Launch, env: &Env, io: &mut Io<'_>) -> Result<(), Failure> {
    let flags = argparse::parse(PROG, OPTS, &launch.script_args)?;
    let Some(video) = flags.str("input_video") else {
        return Err(argparse::usage_error(PROG, OPTS, "the following arguments are required: --input_video"));
    };
    if env.vllm_method.as_deref() != Some("spawn") {
        return Err(Failure::Python {
            kind: "RuntimeError",
            msg: "Cannot re-initialize CUDA in forked subprocess. To use CUDA with multiprocessing, you must use \
                  the 'spawn' start method: set VLLM_WORKER_MULTIPROC_METHOD=spawn"
                .into(),
        });
    }
    let checkpoints = flags.str("checkpoint_dir").unwrap_or("checkpoints");
    let _ =
        writeln!(io.out, "Loading Pixtral prompt upsampler from {checkpoints} (Cosmos stand-in: no weights are read)");
    let _ = io.out.flush();
    // `extract_video_frames` reads frames with OpenCV, which yields none for a
    // missing or unreadable file instead of failing: the model then sees the text alone.
    let video_sha = output::sha256_file(video).unwrap_or_default();
    let prompt = flags.str("prompt").filter(|p| !p.is_empty()).unwrap_or(NO_PROMPT);
    crate::transfer::diffuse(io, env, "Processed prompts", 1, crate::transfer::step_ms(env)?)?;
    let _ = writeln!(io.out, "Upsampled prompt: {}", upsample_prompt(prompt, &video_sha));
    if flags.flag("offload_prompt_upsampler") {
        let _ = writeln!(io.out, "Offloading the prompt upsampler (Cosmos stand-in: nothing was loaded)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{one_gpu, run_args};

    const SCRIPT: &str = "/workspace/cosmos_transfer1/auxiliary/upsampler/inference/upsampler_pipeline.py";

    fn spawn() -> Env {
        Env { vllm_method: Some("spawn".into()), ..one_gpu() }
    }

    #[test]
    fn upsampled_prompts_name_the_video() {
        let sha = "ab12cd34".to_string() + &"0".repeat(56);
        let up = upsample_prompt("  a  car\non a road ", &sha);
        assert!(up.starts_with("a car on a road. "), "{up}");
        assert!(up.ends_with("(video ab12cd34)"), "{up}");
        assert_eq!(up, upsample_prompt("a car on a road", &sha));
        assert_eq!(upsample_prompt("", &sha), format!("{} (video ab12cd34)", SENTENCES[0xab % 8]));
        assert!(upsample_prompt("x", "").ends_with("(no video frames)"));
    }

    #[test]
    fn prints_the_result_on_stdout_and_writes_no_file() {
        let d = tempfile::tempdir().unwrap();
        let video = d.path().join("v.mp4").display().to_string();
        std::fs::write(&video, b"video").unwrap();
        let args = [SCRIPT, "--prompt", "a cat", "--input_video", &video, "--offload_prompt_upsampler"];
        let (code, _, err) = run_args(&args, &one_gpu());
        assert_eq!(code, 1);
        assert!(err.contains("VLLM_WORKER_MULTIPROC_METHOD=spawn"), "{err}");
        let (code, out, err) = run_args(&args, &spawn());
        assert_eq!(code, 0, "{err}");
        let sha = output::sha256_file(&video).unwrap();
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("Upsampled prompt:")).collect();
        assert_eq!(lines, [format!("Upsampled prompt: {}", upsample_prompt("a cat", &sha))]);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "only the video: no result file");
        // `--prompt=TEXT` keeps a prompt that starts with a dash a value.
        let (code, out, _) = run_args(&[SCRIPT, "--prompt=-dashed", "--input_video", &video], &spawn());
        assert_eq!(code, 0);
        assert!(out.contains("Upsampled prompt: -dashed. "), "{out}");
    }

    #[test]
    fn without_a_prompt_or_readable_video_it_still_answers() {
        let (code, out, err) = run_args(&[SCRIPT, "--input_video", "/nonexistent/v.mp4"], &spawn());
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(&format!("Upsampled prompt: {}", upsample_prompt(NO_PROMPT, ""))), "{out}");
    }

    #[test]
    fn its_flags_are_the_real_ones() {
        let (code, _, err) = run_args(&[SCRIPT, "--prompt", "p"], &spawn());
        assert_eq!(code, 2);
        assert!(err.ends_with("upsampler_pipeline.py: error: the following arguments are required: --input_video\n"));
        let (code, _, err) = run_args(&[SCRIPT, "--input", "items.json", "--output", "r.json"], &spawn());
        assert_eq!(code, 2);
        assert!(err.contains("unrecognized arguments: --output r.json"), "{err}");
    }

    #[test]
    fn the_old_script_path_does_not_exist() {
        let old = "/workspace/cosmos_transfer1/auxiliary/upsampler/inference/prompt_upsampler.py";
        let (code, out, err) = run_args(&[old, "--input", "items.json", "--output", "r.json"], &spawn());
        assert_eq!(code, 2);
        assert!(out.is_empty());
        assert_eq!(err, format!("python: can't open file '{old}': [Errno 2] No such file or directory\n"));
    }
}
