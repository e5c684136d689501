//! The Cosmos Transfer part of the HTTP API: blobs, prompts and runs.
//!
//! A run is a job carrying `cosmos.*` labels (see [`crate::cosmos::labels`]),
//! so it is scheduled, retried, cancelled and persisted exactly as any job, and
//! a batch of runs is one atomic job submission. Prompts live in the store's
//! `prompts` table; videos and outputs in the blob store, by sha256.

use super::jobs::{EVENTS_CURSOR_HEADER, NEXT_AFTER_HEADER};
use super::jobs::{submit_specs, view};
use super::{JsonBody, State, answer, bad, bad_line, command_result, error, internal, not_found, unavailable};
use crate::actor::{BlobsInUse, Cancel, FindRun, GetJob, JobSummary, PageJobs, PromptRuns};
use crate::core::{Dep, InputFromDep};
use crate::cosmos::{
    self, BlobRef, ENHANCE_RESULT, NewPrompt, OUTPUT_VIDEO, Prompt, RunKind, TransferParams, UPSCALE_INPUT,
    UpscaleParams, labels,
};
use crate::records::JobState;
use crate::records::StoreOp;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use cosmos_proto::{JobId, JobSpec, Sha256};
use serde::{Deserialize, Serialize};

/// Registers the routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/prompts", web::post().to(create_prompt))
        .route("/v1/prompts", web::get().to(list_prompts))
        .route("/v1/prompts/{id}", web::get().to(show_prompt))
        .route("/v1/prompts/{id}", web::delete().to(delete_prompt))
        .route("/v1/prompts/{id}/enhance", web::post().to(enhance))
        .route("/v1/runs", web::post().to(create_runs))
        .route("/v1/runs", web::get().to(list_runs))
        .route("/v1/runs/{id}", web::get().to(show_run))
        .route("/v1/runs/{id}/cancel", web::post().to(cancel_run))
        .route("/v1/runs/{id}/retry", web::post().to(retry_run))
        .route("/v1/runs/{id}/upscale", web::post().to(upscale))
        .route("/v1/runs/{id}/enhanced", web::post().to(apply_enhancement));
}

/// A run as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunView {
    /// `rs_…`.
    pub id: String,
    /// `transfer`, `upscale` or `enhance`.
    pub kind: String,
    /// The prompt it runs.
    pub prompt_id: String,
    /// That prompt's name, when it still exists.
    pub prompt_name: Option<String>,
    /// The run it upscales, for an upscale.
    pub parent_run: Option<String>,
    /// The job that runs it (`job.id`).
    pub job_id: String,
    /// Its job's state: `queued|assigned|running|retrying|succeeded|failed|cancelled`.
    pub state: String,
    /// Host of its latest attempt.
    pub agent: Option<String>,
    /// GPUs of its live attempt.
    pub gpus: Vec<String>,
    /// Why it failed or is retrying.
    pub error: Option<String>,
    /// The job that runs it, whole.
    pub job: crate::http::JobView,
    /// Its parameters.
    pub params: serde_json::Value,
    /// What it produced, once succeeded.
    pub outputs: Vec<cosmos_proto::ArtifactRef>,
}

/// One run to create: an existing prompt, or a new one created with it.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunLine {
    /// An existing prompt.
    #[serde(default)]
    pub prompt_id: Option<String>,
    /// A prompt to create (its videos already uploaded).
    #[serde(default)]
    pub prompt: Option<NewPrompt>,
    /// The run's parameters (defaults for the missing ones).
    #[serde(default)]
    pub params: TransferParams,
    /// Also an upscale of the run's video, submitted with it: it runs once the
    /// transfer has succeeded, and is cancelled if it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub then_upscale: Option<UpscaleParams>,
}

/// Runs to create together: all or none.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CreateRuns {
    /// One run per line.
    pub runs: Vec<RunLine>,
}

/// A created run.
#[derive(Debug, Serialize, Deserialize)]
pub struct CreatedRun {
    /// `rs_…`.
    pub run_id: String,
    /// Its job.
    pub job_id: String,
    /// Its prompt.
    pub prompt_id: String,
}

/// Answer to [`CreateRuns`].
#[derive(Debug, Serialize, Deserialize)]
pub struct CreatedRuns {
    /// In line order; a line's upscale (`then_upscale`) right after its transfer.
    pub runs: Vec<CreatedRun>,
    /// Prompts created on the way, in line order.
    pub prompts: Vec<Prompt>,
}

/// Reads the store on a blocking thread.
async fn with_store<T: Send + 'static>(
    state: &web::Data<State>,
    f: impl FnOnce(&mut crate::store::Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, HttpResponse> {
    let shared = state.shared.clone();
    match web::block(move || {
        let mut store = shared.reader.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut store)
    })
    .await
    {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(answer(&e)),
        Err(_) => Err(unavailable()),
    }
}

/// Stores records through the core actor's single writer; returns once durable.
async fn persist(state: &web::Data<State>, ops: Vec<StoreOp>) -> Result<(), HttpResponse> {
    match state.core.send(crate::actor::Persist(ops)).await {
        Ok(rx) => rx.await.map_err(|_| unavailable()),
        Err(_) => Err(unavailable()),
    }
}

/// Checks a new prompt and turns it into a record; its videos must be in the blob store.
fn build_prompt(shared: &crate::shared::Shared, new: NewPrompt) -> Result<Prompt, String> {
    new.validate().map_err(|e| e.to_string())?;
    let videos = new.videos.expect("validated");
    check_blobs(&shared.blobs, &videos.all(), "a video")
        .map_err(|e| format!("{e}: upload it first (PUT /v1/blobs/{{sha256}}; the CLI does)"))?;
    let name = new.name.unwrap_or_else(|| cosmos::derive_name(&new.text));
    Ok(Prompt {
        id: crate::shared::new_id("ps"),
        name,
        negative_prompt: new.negative_prompt.unwrap_or_else(|| shared.cosmos.default_negative_prompt.clone()),
        text: new.text,
        videos,
        parent: new.parent,
        created_ms: crate::shared::wall_ms(),
    })
}

async fn create_prompt(state: web::Data<State>, body: JsonBody<NewPrompt>) -> HttpResponse {
    let new = body.value;
    if let Some(parent) = &new.parent {
        let parent = parent.clone();
        match with_store(&state, move |s| s.prompt(&parent)).await {
            Ok(Some(_)) => {}
            Ok(None) => return not_found(format!("no prompt {}: the parent must exist", new.parent.unwrap())),
            Err(r) => return r,
        }
    }
    let prompt = match build_prompt(&state.shared, new) {
        Ok(p) => p,
        Err(e) => return bad(e),
    };
    match persist(&state, vec![StoreOp::PutPrompt(Box::new(prompt.clone()))]).await {
        Ok(()) => HttpResponse::Created().json(prompt),
        Err(r) => r,
    }
}

async fn list_prompts(state: web::Data<State>) -> HttpResponse {
    match with_store(&state, |s| s.prompts()).await {
        Ok(p) => HttpResponse::Ok().json(p),
        Err(r) => r,
    }
}

async fn find_prompt(state: &web::Data<State>, id: &str) -> Result<Prompt, HttpResponse> {
    let key = id.to_string();
    match with_store(state, move |s| s.prompt(&key)).await? {
        Some(p) => Ok(p),
        None => Err(not_found(format!("no prompt {id}; `cosmos prompts list` shows the ids"))),
    }
}

async fn show_prompt(state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    match find_prompt(&state, &id).await {
        Ok(p) => HttpResponse::Ok().json(p),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    delete_outputs: bool,
}

async fn delete_prompt(state: web::Data<State>, id: web::Path<String>, q: web::Query<DeleteQuery>) -> HttpResponse {
    let prompt = match find_prompt(&state, &id).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    // Deleting outputs: no run may be created from a blob between the checks below and its removal.
    let _gc = if q.delete_outputs { Some(state.shared.blob_gc.write().await) } else { None };
    let Ok(runs) = state.core.send(PromptRuns(prompt.id.clone())).await else { return unavailable() };
    let active: Vec<&str> = runs
        .iter()
        .filter(|j| !j.record.state.is_final())
        .filter_map(|j| label(j, labels::RUN).map(String::as_str))
        .collect();
    if !active.is_empty() {
        return error(
            StatusCode::CONFLICT,
            format!(
                "prompt {} has runs still active ({}); cancel them first (`cosmos runs cancel RUN_ID`) or wait for them",
                prompt.id,
                active.join(", ")
            ),
            None,
            false,
        );
    }
    // Counted by distinct content: two outputs with the same bytes are one file in the blob store.
    let (mut removed_outputs, mut kept_outputs, mut output_files) = (0usize, 0usize, 0usize);
    if q.delete_outputs {
        let prompts = match with_store(&state, |s| s.prompts()).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        // Content-addressed: keep a blob another prompt's run, or any other prompt's video, still uses.
        let mine: std::collections::BTreeSet<Sha256> =
            runs.iter().flat_map(|j| j.record.outputs.iter().map(|o| o.sha256)).collect();
        let Ok(mut others) = state.core.send(BlobsInUse { except_prompt: Some(prompt.id.clone()) }).await else {
            return unavailable();
        };
        others.extend(
            prompts.iter().filter(|p| p.id != prompt.id).flat_map(|p| p.videos.all().into_iter().map(|b| b.sha256)),
        );
        for sha in mine.difference(&others) {
            if std::fs::remove_file(state.shared.blobs.path(sha)).is_ok() {
                removed_outputs += 1;
            }
        }
        kept_outputs = mine.intersection(&others).count();
        output_files = runs.iter().map(|j| j.record.outputs.len()).sum();
    }
    match persist(&state, vec![StoreOp::DeletePrompt(prompt.id.clone())]).await {
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({
            "deleted": prompt.id,
            "runs": runs.len(),
            "outputs_deleted": removed_outputs,
            "outputs_kept": kept_outputs,
            "output_files": output_files,
        })),
        Err(r) => r,
    }
}

// ---- runs ----

/// An error naming the first of `blobs` the controller does not hold (whole, at its size).
fn check_blobs<'a>(
    store: &cosmos_cas::Store,
    blobs: impl IntoIterator<Item = &'a BlobRef>,
    what: &str,
) -> Result<(), String> {
    for b in blobs {
        if store.size(&b.sha256) != Some(b.size_bytes) {
            return Err(format!("{what} ({}, {} bytes) is not on the controller", b.sha256, b.size_bytes));
        }
    }
    Ok(())
}

fn label<'a>(j: &'a JobSummary, key: &str) -> Option<&'a String> {
    j.record.spec.labels.get(key)
}

fn run_view(j: &JobSummary, prompts: &[Prompt]) -> Option<RunView> {
    let id = label(j, labels::RUN)?.clone();
    let prompt_id = label(j, labels::PROMPT).cloned().unwrap_or_default();
    Some(RunView {
        id,
        kind: label(j, labels::KIND).cloned().unwrap_or_default(),
        prompt_name: prompts.iter().find(|p| p.id == prompt_id).map(|p| p.name.clone()),
        prompt_id,
        parent_run: label(j, labels::PARENT_RUN).cloned(),
        job_id: j.record.id.to_string(),
        state: j.record.state.as_str().to_string(),
        agent: j.record.agent.clone(),
        gpus: j.gpus.clone(),
        error: j.record.error.clone(),
        job: view(j),
        params: label(j, labels::PARAMS).and_then(|p| serde_json::from_str(p).ok()).unwrap_or_default(),
        outputs: j.record.outputs.clone(),
    })
}

/// Stores generated files, then submits the specs as one batch (`inputs_from`:
/// per spec, inputs from the outputs of jobs it waits for); the error names the 1-based line.
async fn submit_compiled(
    state: &web::Data<State>,
    compiled: Vec<cosmos::Compiled>,
    extra: Vec<StoreOp>,
    key: Option<crate::records::Idempotency>,
    inputs_from: Vec<Vec<InputFromDep>>,
    line_of: &[usize],
) -> Result<crate::actor::Submitted, HttpResponse> {
    let blobs = state.shared.blobs.clone();
    let files: Vec<Vec<u8>> = compiled.iter().flat_map(|c| c.files.iter().map(|f| f.bytes.clone())).collect();
    match web::block(move || files.iter().try_for_each(|f| blobs.put_bytes(f).map(|_| ()))).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(internal(format!("cannot store a run's spec file: {e}"))),
        Err(_) => return Err(unavailable()),
    }
    let specs: Vec<JobSpec> = compiled.into_iter().map(|c| c.spec).collect();
    submit_specs(state, specs, extra, key, Vec::new(), inputs_from, Some(line_of)).await
}

/// An upscale's input taken from the output video of the transfer it waits for.
fn upscale_input(dep: Dep) -> Vec<InputFromDep> {
    vec![InputFromDep { dep, output: OUTPUT_VIDEO.into(), path: UPSCALE_INPUT.into() }]
}

/// What a repeated run creation (same idempotency key) answers: the runs and prompts the first one made.
async fn created_before(state: &web::Data<State>, ids: &[JobId], new_prompt_lines: &[bool]) -> HttpResponse {
    let mut runs = Vec::with_capacity(ids.len());
    let mut prompt_ids = Vec::new();
    // Each line's transfer comes first, its upscale (if asked for) after it.
    let mut line = 0;
    for id in ids {
        let Ok(found) = state.core.send(GetJob(*id)).await else { return unavailable() };
        let Some(j) = found.as_ref() else { return internal(format!("job {id} of an earlier submission is gone")) };
        let prompt_id = label(j, labels::PROMPT).cloned().unwrap_or_default();
        if label(j, labels::KIND).map(String::as_str) == Some(RunKind::Transfer.as_str()) {
            if new_prompt_lines.get(line).copied().unwrap_or(false) {
                prompt_ids.push(prompt_id.clone());
            }
            line += 1;
        }
        runs.push(CreatedRun {
            run_id: label(j, labels::RUN).cloned().unwrap_or_default(),
            job_id: id.to_string(),
            prompt_id,
        });
    }
    let prompts = match with_store(state, move |s| {
        prompt_ids.iter().filter_map(|p| s.prompt(p).transpose()).collect::<Result<Vec<_>, _>>()
    })
    .await
    {
        Ok(p) => p,
        Err(r) => return r,
    };
    HttpResponse::Created().json(CreatedRuns { runs, prompts })
}

async fn create_runs(req: HttpRequest, state: web::Data<State>, body: JsonBody<CreateRuns>) -> HttpResponse {
    let key = match crate::http::idempotency(&req, &body.body.bytes) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let lines = body.value.runs;
    let new_prompt_lines: Vec<bool> = lines.iter().map(|l| l.prompt.is_some()).collect();
    if lines.is_empty() {
        return bad("no runs given");
    }
    if lines.len() > cosmos::RUNS_PER_REQUEST_MAX {
        return bad(format!("{} runs in one request; at most {}", lines.len(), cosmos::RUNS_PER_REQUEST_MAX));
    }
    let _gc = state.shared.blob_gc.read().await;
    // Everything is checked before anything is written: one bad line rejects the batch.
    let existing = match with_store(&state, |s| s.prompts()).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let mut new_prompts = Vec::new();
    let mut compiled = Vec::with_capacity(lines.len());
    let mut created = Vec::with_capacity(lines.len());
    let mut inputs_from = Vec::with_capacity(lines.len());
    // The line each compiled spec came from, for the core's errors, which count specs.
    let mut spec_lines = Vec::with_capacity(lines.len());
    for (i, line) in lines.into_iter().enumerate() {
        let n = i + 1;
        if let Err(e) = line.params.validate() {
            return bad_line(n, e);
        }
        if let Some(Err(e)) = line.then_upscale.as_ref().map(UpscaleParams::validate) {
            return bad_line(n, format!("upscale: {e}"));
        }
        let prompt = match (line.prompt_id, line.prompt) {
            (Some(id), None) => match existing.iter().find(|p| p.id == id) {
                Some(p) => {
                    if let Err(e) =
                        check_blobs(&state.shared.blobs, &p.videos.all(), &format!("a video of prompt {id}"))
                    {
                        return bad_line(n, format!("{e}: create the prompt again from its video directory"));
                    }
                    p.clone()
                }
                None => return bad_line(n, format!("no prompt {id}; `cosmos prompts list` shows the ids")),
            },
            (None, Some(new)) => match build_prompt(&state.shared, new) {
                Ok(p) => {
                    new_prompts.push(p.clone());
                    p
                }
                Err(e) => return bad_line(n, e),
            },
            _ => return bad_line(n, "give either `prompt_id` or `prompt`, not both or neither"),
        };
        let run_id = crate::shared::new_id("rs");
        let transfer = compiled.len();
        compiled.push(state.shared.cosmos.compile_transfer(&run_id, &prompt, &line.params));
        inputs_from.push(Vec::new());
        spec_lines.push(n);
        if let Some(up) = &line.then_upscale {
            let up_id = crate::shared::new_id("rs");
            compiled.push(state.shared.cosmos.compile_upscale(&up_id, &run_id, &prompt.id, None, up));
            inputs_from.push(upscale_input(Dep::InBatch(transfer)));
            spec_lines.push(n);
            created.push((run_id, prompt.id.clone()));
            created.push((up_id, prompt.id.clone()));
        } else {
            created.push((run_id, prompt.id.clone()));
        }
    }
    // The new prompts are stored in the same transaction as the runs' jobs: both or neither.
    let extra = new_prompts.iter().map(|p| StoreOp::PutPrompt(Box::new(p.clone()))).collect();
    match submit_compiled(&state, compiled, extra, key, inputs_from, &spec_lines).await {
        Ok((ids, true)) => created_before(&state, &ids, &new_prompt_lines).await,
        Ok((ids, false)) => HttpResponse::Created().json(CreatedRuns {
            runs: created
                .into_iter()
                .zip(ids)
                .map(|((run_id, prompt_id), job)| CreatedRun { run_id, job_id: job.to_string(), prompt_id })
                .collect(),
            prompts: new_prompts,
        }),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct RunQuery {
    /// Only runs of this prompt.
    prompt: Option<String>,
    /// Only runs in this job state.
    state: Option<String>,
    /// Words that must all appear in the run id, kind, prompt id, name or text.
    q: Option<String>,
    /// Only runs submitted at or after this time (ms since the Unix epoch).
    since_ms: Option<u64>,
    /// Runs after this job (the previous page's `Cosmos-Next-After`).
    after: Option<String>,
    /// At most this many (as `GET /v1/jobs` takes it).
    limit: Option<usize>,
}

/// A page of runs, in job id order: only the jobs of the page are looked at,
/// with the filters applied as the core scans (as `GET /v1/jobs` does), so a
/// listing never copies every job out of the core.
async fn list_runs(state: web::Data<State>, q: web::Query<RunQuery>) -> HttpResponse {
    let wanted_state = match q.state.as_deref().map(|s| JobState::parse(s).ok_or(s)) {
        Some(Err(s)) => {
            return bad(format!(
                "unknown state `{s}`: use queued, assigned, running, retrying, succeeded, failed or cancelled"
            ));
        }
        Some(Ok(st)) => Some(st),
        None => None,
    };
    let after = match q.after.as_deref().map(|a| a.parse::<JobId>()).transpose() {
        Ok(a) => a,
        Err(e) => return bad(format!("`after`: {e}; give the job id of the previous page's {NEXT_AFTER_HEADER}")),
    };
    let limit = match super::jobs::page_limit(q.limit) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let prompts = match with_store(&state, |s| s.prompts()).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let words: Vec<String> = q.q.as_deref().unwrap_or("").split_whitespace().map(|w| w.to_lowercase()).collect();
    // What the words are matched against beyond the run's own labels: its prompt's name and text.
    let prompt_text: std::collections::HashMap<String, String> =
        prompts.iter().map(|p| (p.id.clone(), format!("{} {}", p.name, p.text).to_lowercase())).collect();
    let (since_ms, prompt) = (q.since_ms, q.prompt.clone());
    let filter = Box::new(move |r: &crate::records::JobRecord| {
        let labels = &r.spec.labels;
        let Some(run) = labels.get(labels::RUN) else { return false };
        let prompt_id = labels.get(labels::PROMPT).map_or("", String::as_str);
        wanted_state.is_none_or(|s| r.state == s)
            && since_ms.is_none_or(|t| r.submitted_ms >= t)
            && prompt.as_deref().is_none_or(|p| prompt_id == p)
            && (words.is_empty() || {
                let kind = labels.get(labels::KIND).map_or("", String::as_str);
                let text = prompt_text.get(prompt_id).map_or("", String::as_str);
                let hay = format!("{run} {kind} {prompt_id} {text}").to_lowercase();
                words.iter().all(|w| hay.contains(w.as_str()))
            })
    });
    let Ok(page) = state.core.send(PageJobs { after, limit, filter }).await else { return unavailable() };
    let mut response = HttpResponse::Ok();
    response.insert_header((EVENTS_CURSOR_HEADER, page.events.to_string()));
    if let Some(next) = page.next_after {
        response.insert_header((NEXT_AFTER_HEADER, next.to_string()));
    }
    response.json(page.jobs.iter().filter_map(|j| run_view(j, &prompts)).collect::<Vec<RunView>>())
}

async fn find_run(state: &web::Data<State>, id: &str) -> Result<(JobSummary, Vec<Prompt>), HttpResponse> {
    let not_found_run = || not_found(format!("no run {id}; `cosmos runs list` shows the ids"));
    let job = state.core.send(FindRun(id.to_string())).await.map_err(|_| unavailable())?.ok_or_else(not_found_run)?;
    let prompt = match label(&job, labels::PROMPT) {
        Some(p) => {
            let p = p.clone();
            with_store(state, move |s| s.prompt(&p)).await?
        }
        None => None,
    };
    Ok((job, prompt.into_iter().collect()))
}

async fn show_run(state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    match find_run(&state, &id).await {
        Ok((j, prompts)) => HttpResponse::Ok().json(run_view(&j, &prompts)),
        Err(r) => r,
    }
}

/// Re-queues a failed or cancelled run (the same run id; its job gets a fresh attempt budget).
async fn retry_run(state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    let job = match find_run(&state, &id).await {
        Ok((j, _)) => j.record.id,
        Err(r) => return r,
    };
    command_result(state.core.send(crate::actor::Retry(job)).await).await
}

async fn cancel_run(state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    let job = match find_run(&state, &id).await {
        Ok((j, _)) => j.record.id,
        Err(r) => return r,
    };
    command_result(state.core.send(Cancel(job)).await).await
}

/// A run of `kind` that succeeded, and its output at `path`.
async fn succeeded_output(
    state: &web::Data<State>,
    id: &str,
    kind: RunKind,
    wrong_kind: &str,
    path: &str,
) -> Result<(JobSummary, BlobRef), HttpResponse> {
    let (job, _) = find_run(state, id).await?;
    if label(&job, labels::KIND).map(String::as_str) != Some(kind.as_str()) {
        return Err(bad(format!("run {id} {wrong_kind}")));
    }
    if job.record.state != JobState::Succeeded {
        return Err(error(
            StatusCode::CONFLICT,
            format!(
                "run {id} is {}; only a succeeded run has its output (`cosmos runs show {id}`)",
                job.record.state.as_str()
            ),
            None,
            false,
        ));
    }
    let Some(out) = job.record.outputs.iter().find(|o| o.path == path) else {
        return Err(error(StatusCode::CONFLICT, format!("run {id} has no {path}"), None, false));
    };
    let blob = BlobRef { sha256: out.sha256, size_bytes: out.size_bytes };
    Ok((job, blob))
}

#[derive(Deserialize)]
struct UpscaleQuery {
    /// The transfer may still be queued or running: the upscale waits for it
    /// to succeed, takes its video then, and is cancelled if it does not.
    #[serde(default)]
    after: bool,
}

async fn upscale(
    state: web::Data<State>,
    id: web::Path<String>,
    q: web::Query<UpscaleQuery>,
    body: JsonBody<UpscaleParams>,
) -> HttpResponse {
    let params = body.value;
    if let Err(e) = params.validate() {
        return bad(e.to_string());
    }
    let _gc = state.shared.blob_gc.read().await;
    let wrong_kind = "is not a transfer run; only a transfer's video can be upscaled";
    if q.after {
        let (parent, _) = match find_run(&state, &id).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        if label(&parent, labels::KIND).map(String::as_str) != Some(RunKind::Transfer.as_str()) {
            return bad(format!("run {id} {wrong_kind}"));
        }
        match parent.record.state {
            // Its video is known already: the upscale as without `after`.
            JobState::Succeeded => {}
            JobState::Failed | JobState::Cancelled => {
                return error(
                    StatusCode::CONFLICT,
                    format!(
                        "run {id} {}, so an upscale after it would never run; retry it first (`cosmos runs retry {id}`)",
                        parent.record.state.as_str()
                    ),
                    None,
                    false,
                );
            }
            _ => {
                let run_id = crate::shared::new_id("rs");
                let prompt_id = label(&parent, labels::PROMPT).cloned().unwrap_or_default();
                let compiled = state.shared.cosmos.compile_upscale(&run_id, &id, &prompt_id, None, &params);
                let from = vec![upscale_input(Dep::Job(parent.record.id))];
                return match submit_compiled(&state, vec![compiled], Vec::new(), None, from, &[1]).await {
                    Ok((ids, _)) => {
                        HttpResponse::Created().json(CreatedRun { run_id, job_id: ids[0].to_string(), prompt_id })
                    }
                    Err(r) => r,
                };
            }
        }
    }
    let (job, video) = match succeeded_output(&state, &id, RunKind::Transfer, wrong_kind, OUTPUT_VIDEO).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(e) = check_blobs(&state.shared.blobs, [&video], &format!("the video of run {id}")) {
        return error(
            StatusCode::CONFLICT,
            format!("{e} (its outputs were deleted with its prompt); run it again to upscale it"),
            None,
            false,
        );
    }
    let run_id = crate::shared::new_id("rs");
    let prompt_id = label(&job, labels::PROMPT).cloned().unwrap_or_default();
    let compiled = state.shared.cosmos.compile_upscale(&run_id, &id, &prompt_id, Some(&video), &params);
    match submit_compiled(&state, vec![compiled], Vec::new(), None, Vec::new(), &[1]).await {
        Ok((ids, _)) => HttpResponse::Created().json(CreatedRun { run_id, job_id: ids[0].to_string(), prompt_id }),
        Err(r) => r,
    }
}

async fn enhance(state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    let prompt = match find_prompt(&state, &id).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let _gc = state.shared.blob_gc.read().await;
    if let Err(e) =
        check_blobs(&state.shared.blobs, [&prompt.videos.color], &format!("the color video of prompt {}", prompt.id))
    {
        return error(StatusCode::CONFLICT, format!("{e}: create the prompt again"), None, false);
    }
    let run_id = crate::shared::new_id("rs");
    let compiled = state.shared.cosmos.compile_enhance(&run_id, &prompt);
    match submit_compiled(&state, vec![compiled], Vec::new(), None, Vec::new(), &[1]).await {
        Ok((ids, _)) => {
            HttpResponse::Created().json(CreatedRun { run_id, job_id: ids[0].to_string(), prompt_id: prompt.id })
        }
        Err(r) => r,
    }
}

/// How to apply an enhancement's result.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ApplyEnhancement {
    /// Replace the prompt's text in place instead of creating `<name>_enhanced`.
    #[serde(default)]
    pub overwrite: bool,
}

async fn apply_enhancement(
    state: web::Data<State>,
    id: web::Path<String>,
    body: JsonBody<ApplyEnhancement>,
) -> HttpResponse {
    let (job, result) =
        match succeeded_output(&state, &id, RunKind::Enhance, "is not a prompt enhancement", ENHANCE_RESULT).await {
            Ok(x) => x,
            Err(r) => return r,
        };
    // The upsampler's output is not the controller's fault: say which run to redo.
    let unusable = |why: String| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the result of enhancement run {id} {why}; run `cosmos prompt-enhance` again"),
            None,
            false,
        )
    };
    let stdout = match crate::blobs::read_enhance_stdout(&state.shared.blobs, &result.sha256) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return unusable("is no longer on the controller".into()),
        Err(e) => return internal(format!("cannot read the enhancement result {}: {e}", result.sha256)),
    };
    let upsampled = match cosmos::upsampled_prompt(&stdout) {
        Some(text) if text.len() <= cosmos::PROMPT_BYTES_MAX => text,
        Some(text) => {
            return unusable(format!("is a prompt of {} bytes, over {}", text.len(), cosmos::PROMPT_BYTES_MAX));
        }
        None => {
            return unusable(format!("has no `{}` line on its standard output", cosmos::UPSAMPLED_PREFIX.trim_end()));
        }
    };
    let prompt_id = label(&job, labels::PROMPT).cloned().unwrap_or_default();
    let parent = match find_prompt(&state, &prompt_id).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let body = body.value;
    let updated = if body.overwrite {
        Prompt { text: upsampled, ..parent }
    } else {
        let mut name = format!("{}_enhanced", parent.name);
        name.truncate(cosmos::PROMPT_NAME_BYTES_MAX);
        Prompt {
            id: crate::shared::new_id("ps"),
            name,
            text: upsampled,
            parent: Some(parent.id.clone()),
            created_ms: crate::shared::wall_ms(),
            ..parent
        }
    };
    match persist(&state, vec![StoreOp::PutPrompt(Box::new(updated.clone()))]).await {
        Ok(()) => HttpResponse::Ok().json(updated),
        Err(r) => r,
    }
}
