//! Prompts as the store keeps them: their text and the videos they transfer, by digest.

use cosmos_proto::Sha256;
use serde::{Deserialize, Serialize};

/// A content-addressed file in the controller's blob store.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// Digest of the content.
    pub sha256: Sha256,
    /// Its size.
    pub size_bytes: u64,
}

/// The videos of a prompt: `color.mp4` and the optional control videos.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptVideos {
    /// The input video (`color.mp4`); required.
    pub color: BlobRef,
    /// `depth.mp4`, when the directory had one.
    #[serde(default)]
    pub depth: Option<BlobRef>,
    /// `segmentation.mp4`, when the directory had one.
    #[serde(default)]
    pub seg: Option<BlobRef>,
}

impl PromptVideos {
    /// Every video given: color, then depth and segmentation when present.
    pub fn all(&self) -> Vec<BlobRef> {
        std::iter::once(self.color).chain(self.depth).chain(self.seg).collect()
    }
}

/// A prompt (`ps_…`): text plus the videos it transfers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prompt {
    /// `ps_` and 12 hex digits.
    pub id: String,
    /// Short name, `[a-z0-9_]`.
    pub name: String,
    /// The prompt text.
    pub text: String,
    /// What the model should avoid.
    pub negative_prompt: String,
    /// Its videos.
    pub videos: PromptVideos,
    /// The prompt this one was enhanced from.
    #[serde(default)]
    pub parent: Option<String>,
    /// Created at (ms since the Unix epoch).
    pub created_ms: u64,
}
