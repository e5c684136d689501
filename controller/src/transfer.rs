//! Cosmos Transfer runs: prompts, run parameters, and how a run compiles into a job.

use serde::{Deserialize, Serialize};

/// How runs compile into jobs: where the model lives and how its container is set up.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransferConfig {
    /// Container image with the cosmos-transfer1 checkout; `None` runs `torchrun`
    /// from the agent's PATH (the process runtime, e.g. the stand-in under `cosmos up`).
    pub image: Option<String>,
    /// The checkout root inside the image (scripts and `checkpoints/` under it).
    pub checkout_dir: String,
    /// Agent volume mounted at `<checkout_dir>/checkpoints` (image runs only).
    pub checkpoint_volume: Option<String>,
    /// Agent volume mounted as the Hugging Face cache (image runs only).
    pub hf_cache_volume: Option<String>,
    /// Shared memory for the container.
    pub shm_bytes: u64,
    /// Negative prompt given to prompts created without one.
    pub default_negative_prompt: String,
    /// Time limit of one attempt of a run.
    pub timeout_ms: u64,
    /// Attempts per run, the first included.
    pub max_attempts: u32,
}

/// The negative prompt the predecessor used by default.
pub const DEFAULT_NEGATIVE_PROMPT: &str = "The video captures a game playing, with bad crappy graphics and cartoonish frames. It represents a recording of old outdated games. The lighting looks very fake. The textures are very raw and basic. The geometries are very primitive. The images are very pixelated and of poor CG quality. There are many subtitles in the footage. Overall, the video is unrealistic at all.";

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            image: None,
            checkout_dir: "/workspace".into(),
            checkpoint_volume: Some("checkpoints".into()),
            hf_cache_volume: Some("hf_cache".into()),
            shm_bytes: 8 << 30,
            default_negative_prompt: DEFAULT_NEGATIVE_PROMPT.into(),
            timeout_ms: 4 * 3600 * 1000,
            max_attempts: 3,
        }
    }
}
