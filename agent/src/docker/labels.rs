//! The labels every container of this agent carries: written at creation,
//! read back at start-up (adoption) and by the reaper. With the attempt's
//! `attempt.json`, when it survived, they are what recovery trusts.

use super::DockerConfig;
use crate::runtime::{StartRequest, unix_ms};
use cosmos_proto::{AttemptId, Epoch, JobId};
use std::collections::HashMap;

/// Label: the agent that started the container (its name).
pub const LABEL_AGENT: &str = "cosmos.agent";
/// Label: the attempt, as `att-<n>`.
pub const LABEL_ATTEMPT: &str = "cosmos.attempt";
/// Label: the job, as `job-<n>`.
pub const LABEL_JOB: &str = "cosmos.job";
/// Label: the controller epoch that ordered the attempt, as a number.
pub const LABEL_EPOCH: &str = "cosmos.epoch";
/// Label: the attempt's GPU uuids, comma-separated.
pub const LABEL_GPUS: &str = "cosmos.gpus";
/// Label: the attempt's time limit in milliseconds.
pub const LABEL_TIMEOUT_MS: &str = "cosmos.timeout_ms";
/// Label: when the agent created the container, in milliseconds since the Unix epoch.
pub const LABEL_CREATED_MS: &str = "cosmos.created_unix_ms";

/// The labels of an attempt's container.
pub(super) fn for_attempt(config: &DockerConfig, req: &StartRequest) -> HashMap<String, String> {
    // The job's own labels first: ours (`cosmos.*`) are the ones recovery trusts.
    let mut labels: HashMap<String, String> = req
        .spec
        .labels
        .iter()
        .filter(|(k, _)| !k.starts_with("cosmos."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.extend([
        (LABEL_AGENT.to_string(), config.agent_name.clone()),
        (LABEL_ATTEMPT.to_string(), req.attempt_id.to_string()),
        (LABEL_JOB.to_string(), req.job_id.to_string()),
        (LABEL_EPOCH.to_string(), req.epoch.0.to_string()),
        (LABEL_GPUS.to_string(), req.gpu_uuids.join(",")),
        (LABEL_TIMEOUT_MS.to_string(), req.spec.timeout_ms.to_string()),
        (LABEL_CREATED_MS.to_string(), unix_ms().to_string()),
    ]);
    labels
}

/// The engine's list filter that selects this agent's containers.
pub(super) fn filter(agent_name: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([("label".to_string(), vec![format!("{LABEL_AGENT}={agent_name}")])])
}

/// The attempt a container's labels name, if they name one.
pub(super) fn attempt_of(labels: &HashMap<String, String>) -> Option<AttemptId> {
    labels.get(LABEL_ATTEMPT).and_then(|a| a.parse::<AttemptId>().ok())
}

/// What a container's labels say about its attempt; a missing or unreadable
/// label reads as 0 (or empty).
pub(super) struct Labelled {
    pub(super) job_id: JobId,
    pub(super) epoch: Epoch,
    pub(super) gpu_uuids: Vec<String>,
    pub(super) timeout_ms: u64,
    pub(super) created_unix_ms: u64,
}

impl Labelled {
    pub(super) fn read(labels: &HashMap<String, String>) -> Labelled {
        let number = |k: &str| labels.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Labelled {
            job_id: labels.get(LABEL_JOB).and_then(|j| j.parse().ok()).unwrap_or_default(),
            epoch: Epoch(number(LABEL_EPOCH)),
            gpu_uuids: labels
                .get(LABEL_GPUS)
                .map(|g| g.split(',').filter(|s| !s.is_empty()).map(String::from).collect())
                .unwrap_or_default(),
            timeout_ms: number(LABEL_TIMEOUT_MS),
            created_unix_ms: number(LABEL_CREATED_MS),
        }
    }
}
