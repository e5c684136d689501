//! `cosmos jobs …`, `cosmos agents …` and `cosmos status`: the client commands.

use crate::client::{ApiError, Client, ClientArgs, printable};
use anyhow::{Context, bail};
use cosmos_controller::http::{AgentInfo, JobLine, JobView, RESERVED_LABEL_PREFIX, StatusBody, SubmitRequest};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, IsTerminal};
use std::path::Path;
use std::time::Duration;

/// How long `wait` lets its display stand with no change (elapsed times move on).
const WAIT_REDRAW_MS: u64 = 250;
/// Running jobs shown with their own bar at once; the rest are counted in the batch bar.
const JOB_BARS_MAX: usize = 12;

/// Reads a JSONL batch: one job per line; blank lines and `#` comments skipped.
/// Any bad line rejects the whole file, naming the line and what is wrong.
pub fn read_batch(path: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut jobs = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(trimmed)
            .with_context(|| format!("{}:{}: not valid JSON; nothing was submitted", path.display(), i + 1))?;
        // Checked here too, so a typo is named before anything reaches the controller.
        let job: JobLine = serde_json::from_value(value.clone())
            .with_context(|| format!("{}:{}: not a valid job line; nothing was submitted", path.display(), i + 1))?;
        if let Some(label) = job.labels.keys().find(|k| k.starts_with(RESERVED_LABEL_PREFIX)) {
            bail!(
                "{}:{}: label `{label}` is reserved: `{RESERVED_LABEL_PREFIX}*` labels are set by the controller for Cosmos runs; rename it; nothing was submitted",
                path.display(),
                i + 1
            );
        }
        job.into_spec().validate().with_context(|| format!("{}:{}: nothing was submitted", path.display(), i + 1))?;
        jobs.push(value);
    }
    if jobs.is_empty() {
        bail!("{} holds no job lines", path.display());
    }
    Ok(jobs)
}

/// Submits a batch; prints the ids; with `wait`, follows it to the end.
pub fn submit(args: &ClientArgs, file: &Path, wait_for_end: bool) -> anyhow::Result<bool> {
    let jobs = read_batch(file)?;
    let client = Client::new(args)?;
    let n = jobs.len();
    let answer: serde_json::Value =
        client.post("/v1/jobs", &SubmitRequest { jobs }).map_err(|e| match e.downcast::<ApiError>() {
            Ok(api) => match api.body.line {
                Some(line) => anyhow::anyhow!(
                    "{}: job {line} (counting job lines): {}; nothing was submitted",
                    file.display(),
                    api.body.error
                ),
                None => anyhow::anyhow!("{}; nothing was submitted", api.body.error),
            },
            Err(e) => e,
        })?;
    let ids: Vec<String> =
        serde_json::from_value(answer["ids"].clone()).context("unexpected answer to a submission")?;
    if args.json {
        // The ids (scripts read them as `["job-1", …]`); with `--wait`, the final job objects instead.
        if !wait_for_end {
            println!("{}", serde_json::to_string(&ids)?);
        }
    } else {
        println!("submitted {n} jobs: {} … {}", ids.first().map_or("", |s| s), ids.last().map_or("", |s| s));
    }
    if wait_for_end { wait(args, &client, &ids) } else { Ok(true) }
}

/// Waits until every job in `ids` is final, showing progress; true when all succeeded.
pub fn wait(args: &ClientArgs, client: &Client, ids: &[String]) -> anyhow::Result<bool> {
    wait_for(args, client, ids, &BTreeMap::new(), true)
}

/// [`wait`], showing each job under its name in `names` (a run id, say) where it has one,
/// and printing the final summary (or, with `--json`, the jobs) only when `summary` is set:
/// commands that wait on the way to their own answer print that instead.
pub fn wait_for(
    args: &ClientArgs,
    client: &Client,
    ids: &[String],
    names: &BTreeMap<String, String>,
    summary: bool,
) -> anyhow::Result<bool> {
    let shown = |id: &str| names.get(id).map_or_else(|| id.to_string(), |n| format!("{n} ({id})"));
    let interactive = std::io::stderr().is_terminal() && !args.json;
    let multi = MultiProgress::with_draw_target(if interactive {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    // Counted per job: an id given twice is one job.
    let unique = ids.iter().collect::<BTreeSet<_>>().len();
    let batch = multi.add(ProgressBar::new(unique as u64));
    batch.set_style(
        ProgressStyle::with_template("{prefix:>15} [{bar:40}] {pos}/{len} done  {msg}").unwrap().progress_chars("=> "),
    );
    batch.set_prefix("batch");
    let job_style =
        ProgressStyle::with_template("{prefix:>15} [{bar:40}] {pos}/{len} {msg}").unwrap().progress_chars("=> ");
    let mut bars: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let mut last_state: HashMap<String, String> = HashMap::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    // A controller restart loses nothing: keep waiting through it, within the bound.
    let mut reconnect = client.reconnect();
    // One listing, then each change from the controller's event stream.
    let mut follower = crate::follow::Follower::start(client, ids, &mut reconnect)?;
    loop {
        for j in follower.take_changed() {
            let final_ = matches!(j.state.as_str(), "succeeded" | "failed" | "cancelled");
            if last_state.get(&j.id) != Some(&j.state) {
                if !interactive && !args.json {
                    let extra =
                        j.error.as_deref().map(|e| format!(" ({})", error_summary(Some(e)))).unwrap_or_default();
                    println!("{} {} {}{extra}", shown(&j.id), printable(&j.name), j.state);
                }
                if let Some(n) = last_state.insert(j.id.clone(), j.state.clone()).and_then(|old| counts.get_mut(&old)) {
                    *n -= 1;
                }
                *counts.entry(j.state.clone()).or_insert(0) += 1;
            }
            if interactive {
                match (bars.get(&j.id), final_, j.state.as_str()) {
                    (Some(bar), true, _) => {
                        bar.finish_and_clear();
                        multi.remove(bar);
                        bars.remove(&j.id);
                    }
                    (Some(bar), false, _) => {
                        if let Some((step, total)) = j.progress {
                            bar.set_length(u64::from(total.max(1)));
                            bar.set_position(u64::from(step));
                        }
                        bar.set_message(format!("{} on {}", j.state, j.agent.as_deref().unwrap_or("-")));
                    }
                    (None, false, "running") if bars.len() < JOB_BARS_MAX => {
                        let bar = multi.add(ProgressBar::new(1));
                        bar.set_style(job_style.clone());
                        bar.set_prefix(names.get(&j.id).unwrap_or(&j.id).clone());
                        bars.insert(j.id.clone(), bar);
                    }
                    _ => {}
                }
            }
        }
        counts.retain(|_, n| *n > 0);
        let done =
            ["succeeded", "failed", "cancelled"].iter().map(|s| counts.get(*s).copied().unwrap_or(0)).sum::<usize>();
        batch.set_position(done as u64);
        batch.set_message(counts.iter().map(|(s, n)| format!("{s} {n}")).collect::<Vec<_>>().join(", "));
        if done == unique && follower.known() == unique {
            batch.finish();
            let mine: Vec<&JobView> = follower.views();
            let failed: Vec<&&JobView> = mine.iter().filter(|j| j.state != "succeeded").collect();
            if !summary {
            } else if args.json {
                println!("{}", serde_json::to_string_pretty(&mine)?);
            } else {
                let noun = if names.is_empty() { "jobs" } else { "runs" };
                println!("{} of {} {noun} succeeded", ids.len() - failed.len(), ids.len());
                for j in &failed {
                    let error = j.error.as_deref().unwrap_or("-");
                    let mut lines = error.lines();
                    println!(
                        "  {} {} {}: {}",
                        shown(&j.id),
                        printable(&j.name),
                        j.state,
                        printable(lines.next().unwrap_or_default())
                    );
                    // The stderr lines the error quotes, under it.
                    for l in lines {
                        println!("    {}", printable(l));
                    }
                }
                match failed.first() {
                    Some(first) if names.contains_key(&first.id) => {
                        println!("  logs: cosmos runs logs {}", names[&first.id]);
                    }
                    Some(first) => println!("  logs: cosmos jobs logs {}", first.id),
                    None => {}
                }
            }
            return Ok(failed.is_empty());
        }
        follower.wait_change(Duration::from_millis(WAIT_REDRAW_MS), &mut reconnect)?;
    }
}

/// Which page of a listing: `cosmos jobs list --limit N --after ID`, or `--all`.
#[derive(clap::Args, Debug, Clone)]
pub struct PageArgs {
    /// At most this many (default 1000; at most 10000 a page).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Only those after this job (`job-N`): the next page, as the hint under a full page says.
    #[arg(long)]
    pub after: Option<String>,
    /// Every one, page after page (a large history is a lot of output).
    #[arg(long, conflicts_with = "limit")]
    pub all: bool,
}

/// Reads the listing at `path` (a `GET` taking `limit` and `after`, answering a
/// JSON array and the next page's cursor in `Cosmos-Next-After`): one page, or
/// with `--all` every page. Returns what was read and, when more follow, where.
pub fn read_pages<T: serde::de::DeserializeOwned>(
    client: &Client,
    path: &str,
    mut query: Vec<String>,
    page: &PageArgs,
) -> anyhow::Result<(Vec<T>, Option<String>)> {
    use cosmos_controller::http::jobs::{JOBS_PAGE_DEFAULT, JOBS_PAGE_MAX, NEXT_AFTER_HEADER};
    let limit = if page.all { JOBS_PAGE_MAX } else { page.limit.unwrap_or(JOBS_PAGE_DEFAULT) };
    query.push(format!("limit={limit}"));
    let mut after = page.after.clone();
    let mut items = Vec::new();
    loop {
        let mut q = query.clone();
        if let Some(a) = &after {
            q.push(format!("after={a}"));
        }
        let (got, headers) = client.get_with::<Vec<T>>(&format!("{path}?{}", q.join("&")), &[NEXT_AFTER_HEADER])?;
        items.extend(got);
        match headers.into_iter().next().flatten() {
            Some(next) if page.all => after = Some(next),
            next => return Ok((items, next)),
        }
    }
}

/// `cosmos jobs list`.
pub fn list(args: &ClientArgs, state: Option<&str>, since: Option<&str>, page: &PageArgs) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let mut query = Vec::new();
    if let Some(s) = state {
        query.push(format!("state={s}"));
    }
    if let Some(since) = since {
        query.push(format!("since_ms={}", since_ms(since)?));
    }
    let (jobs, next) = read_pages::<JobView>(&client, "/v1/jobs", query, page)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&jobs)?);
        if let Some(next) = &next {
            eprintln!("more jobs follow: cosmos jobs list --after {next} (or --all)");
        }
        return Ok(());
    }
    println!(
        "{:<12} {:<24} {:<10} {:>8} {:<14} {:>4} {:>8} {:>8} {:>5}  ERROR",
        "ID", "NAME", "STATE", "ATTEMPTS", "HOST", "GPUS", "ELAPSED", "GPU-S", "EXIT"
    );
    for j in jobs {
        println!(
            "{:<12} {:<24} {:<10} {:>8} {:<14} {:>4} {:>8} {:>8} {:>5}  {}",
            truncate(&j.id, 12),
            truncate(&printable(&j.name), 24),
            j.state,
            j.attempts,
            truncate(&printable(j.agent.as_deref().unwrap_or("-")), 14),
            j.gpus_requested,
            elapsed_text(j.elapsed_ms),
            gpu_seconds_text(j.gpu_seconds),
            j.exit_code.map_or("-".to_string(), |c| c.to_string()),
            error_summary(j.error.as_deref())
        );
    }
    if let Some(next) = next {
        eprintln!("more jobs follow: cosmos jobs list --after {next} (or --limit N, --all)");
    }
    Ok(())
}

/// A duration for a table cell: `-` (never started), `42.0s`, `12m05s`, `3h07m`.
pub fn elapsed_text(ms: Option<u64>) -> String {
    let Some(ms) = ms else { return "-".into() };
    let s = ms / 1000;
    match s {
        0..60 => format!("{:.1}s", ms as f64 / 1000.0),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// GPU-seconds for a table cell: whole seconds from 10 on, else one decimal.
pub fn gpu_seconds_text(gpu_s: f64) -> String {
    if gpu_s >= 10.0 { format!("{gpu_s:.0}") } else { format!("{gpu_s:.1}") }
}

/// An error for one table row: its first line, the summary, which ends with
/// the command's last word on stderr; the lines under it (the end of its
/// stderr) are for `show`, so a row stays one line.
pub fn error_summary(error: Option<&str>) -> String {
    let Some(error) = error else { return String::new() };
    match error.split_once('\n') {
        Some((first, _)) => format!("{} …", printable(first)),
        None => printable(error).into_owned(),
    }
}

/// `s` cut to `n` characters (the last one `…`), so a long value cannot push a table's columns.
pub fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { s.chars().take(n - 1).collect::<String>() + "…" }
}

/// `cosmos jobs show`.
pub fn show(args: &ClientArgs, id: &str) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let j: JobView = client.get(&format!("/v1/jobs/{id}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!(
        "{} {}  state {}  attempts {}  priority {}  gpus {}",
        j.id,
        printable(&j.name),
        j.state,
        j.attempts,
        j.priority,
        j.gpus_requested
    );
    if let Some((step, total)) = j.progress {
        println!("progress {step}/{total}");
    }
    print_error(j.error.as_deref());
    if let Some(why) = &j.waiting {
        println!("waiting: {}", printable(why));
    }
    print_accounting(&j);
    for a in &j.attempt_history {
        println!(
            "  {} on {} [{}] {}  exit {}  {}",
            a.id,
            a.agent,
            a.gpus.join(","),
            a.state,
            a.exit_code.map_or("-".to_string(), |c| c.to_string()),
            error_summary(a.reason.as_deref())
        );
    }
    Ok(())
}

/// The `elapsed … GPU-seconds` line of `jobs show` and `runs show`, once the job has started.
pub fn print_accounting(j: &JobView) {
    if let Some(elapsed) = j.elapsed_ms {
        println!(
            "elapsed {} since its first start, {:.1} GPU-seconds{}",
            elapsed_text(Some(elapsed)),
            j.gpu_seconds,
            if j.retries > 0 { format!(", retried {} times", j.retries) } else { String::new() }
        );
    }
}

/// The `error:` of `jobs show` and `runs show`: its first line, then any lines it quotes, indented.
pub fn print_error(error: Option<&str>) {
    let Some(error) = error else { return };
    let mut lines = error.lines();
    println!("error: {}", printable(lines.next().unwrap_or_default()));
    for l in lines {
        println!("  {}", printable(l));
    }
}

/// `cosmos jobs cancel`.
pub fn cancel(args: &ClientArgs, id: &str) -> anyhow::Result<()> {
    Client::new(args)?.command::<JobView>(
        args.json,
        &format!("/v1/jobs/{id}"),
        "cancel",
        &format!("cancel of {id} recorded"),
    )
}

/// `cosmos jobs retry`.
pub fn retry(args: &ClientArgs, id: &str) -> anyhow::Result<()> {
    Client::new(args)?.command::<JobView>(
        args.json,
        &format!("/v1/jobs/{id}"),
        "retry",
        &format!("{id} re-queued; its earlier attempts stay in `cosmos jobs show {id}`"),
    )
}

/// `--since`: a duration back from now (`90s`, `30m`, `6h`, `2d`) or milliseconds since the Unix epoch.
fn since_ms(text: &str) -> anyhow::Result<u64> {
    let bad = || {
        anyhow::anyhow!("--since {text}: give a duration back from now (90s, 30m, 6h, 2d) or ms since the Unix epoch")
    };
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    Ok(now_ms.saturating_sub(n.saturating_mul(unit_ms)))
}

/// `cosmos jobs logs [-f]`: prints the job's output lines (with `--json`, one
/// [`LogLine`] object a line). A stream that breaks (the controller restarted)
/// is resumed from the positions its `id:` lines reported, so no line is
/// printed twice or lost; lines not yet vouched for by an `id:` are held back.
/// Output without its newline yet (a progress bar redrawn after `\r`) comes
/// as `partial` events and is printed as it is, the line going on after it.
pub fn logs(args: &ClientArgs, id: &str, follow: bool, tail_bytes: Option<u64>) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let tail = tail_bytes.map(|n| format!("&tail_bytes={n}")).unwrap_or_default();
    // Per log file (`att-N/stdout`), the offset printed up to.
    let mut reached: BTreeMap<String, u64> = BTreeMap::new();
    let mut printer = LogPrinter { json: args.json, job: id, midline: None };
    let mut reconnect = client.reconnect();
    let done = loop {
        let path = if reached.is_empty() {
            format!("/v1/jobs/{id}/logs?follow={follow}{tail}")
        } else {
            let resume: Vec<String> = reached.iter().map(|(file, at)| format!("{file}/{at}")).collect();
            format!("/v1/jobs/{id}/logs?follow={follow}&resume={}", resume.join(","))
        };
        let reader = match client.stream(&path) {
            Ok(r) => r,
            Err(e) => {
                reconnect.failed(&client, e)?;
                continue;
            }
        };
        reconnect.reached(&client);
        match printer.print_events(reader, &mut reached) {
            Ok(true) => break Ok(()),
            // A stream that ends cleanly without `end` was cut by a stopping controller.
            Ok(false) if follow => reconnect.failed(&client, crate::client::cut_stream())?,
            Ok(false) => break Ok(()),
            Err(e) => reconnect.failed(&client, anyhow::Error::new(e).context("log stream broke"))?,
        }
    };
    printer.end_line()?;
    done
}

/// One log line as `cosmos jobs logs --json` prints it.
#[derive(Debug, serde::Serialize)]
pub struct LogLine<'a> {
    /// The job.
    pub job_id: &'a str,
    /// The attempt that printed it.
    pub attempt_id: &'a str,
    /// `stdout` or `stderr`.
    pub stream: &'a str,
    /// The line, without its newline.
    pub line: &'a str,
    /// The line's newline has not come yet: the next object of this stream goes on with it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

/// Prints a job's log events as their `id:` positions vouch for them.
struct LogPrinter<'a> {
    json: bool,
    job: &'a str,
    /// The log file (`att-N/stderr`) whose line was printed without its end, if one was.
    midline: Option<String>,
}

impl LogPrinter<'_> {
    /// Prints one stream's events; true once it said `end`.
    fn print_events(
        &mut self,
        reader: Box<dyn std::io::Read + Send>,
        reached: &mut BTreeMap<String, u64>,
    ) -> std::io::Result<bool> {
        // Text, and whether it is a partial line.
        let mut pending: Vec<(String, bool)> = Vec::new();
        let mut event = String::new();
        let mut out = std::io::stdout().lock();
        use std::io::Write;
        let mut reader = std::io::BufReader::new(reader);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            if reader.read_until(b'\n', &mut raw)? == 0 {
                break;
            }
            // A line ends at `\n` only: a `\r` before it is the job's (a progress bar's redraw).
            if raw.last() == Some(&b'\n') {
                raw.pop();
            }
            let line = String::from_utf8_lossy(&raw);
            if line.is_empty() {
                event.clear();
            } else if let Some(kind) = line.strip_prefix("event: ") {
                if kind == "end" {
                    return Ok(true);
                }
                event = kind.to_string();
            } else if let Some(data) = line.strip_prefix("data: ").or_else(|| (line == "data:").then_some("")) {
                match event.as_str() {
                    "" => pending.push((data.to_string(), false)),
                    "partial" => pending.push((data.to_string(), true)),
                    _ => {}
                }
            } else if let Some(position) = line.strip_prefix("id: ") {
                let Some((file, at)) = position.rsplit_once('/') else { continue };
                let Ok(at) = at.parse::<u64>() else { continue };
                let (attempt, stream) = file.split_once('/').unwrap_or((file, ""));
                for (text, partial) in pending.drain(..) {
                    if self.json {
                        let l = LogLine { job_id: self.job, attempt_id: attempt, stream, line: &text, partial };
                        writeln!(out, "{}", serde_json::to_string(&l).map_err(std::io::Error::other)?)?;
                        continue;
                    }
                    // Another file's line does not go on the end of one still being written.
                    if self.midline.as_deref().is_some_and(|m| m != file) {
                        writeln!(out)?;
                    }
                    if partial {
                        write!(out, "{text}")?;
                        self.midline = Some(file.to_string());
                    } else {
                        writeln!(out, "{text}")?;
                        self.midline = None;
                    }
                }
                out.flush()?;
                reached.insert(file.to_string(), at);
            }
        }
        Ok(false)
    }

    /// Ends a line printed without its end, so what comes next starts on its own.
    fn end_line(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        if self.midline.take().is_some() {
            let mut out = std::io::stdout().lock();
            writeln!(out)?;
            out.flush()?;
        }
        Ok(())
    }
}

/// `cosmos agents list`.
pub fn agents(args: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let agents: Vec<AgentInfo> = client.get("/v1/agents")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&agents)?);
        return Ok(());
    }
    print_agents(&agents);
    Ok(())
}

fn print_agents(agents: &[AgentInfo]) {
    println!("{:<16} {:<8} {:<9} {:>5} {:>5}  GPUS", "AGENT", "STATE", "DRAINING", "BUSY", "TOTAL");
    for a in agents {
        let busy = a.gpus.iter().filter(|g| g.attempt.is_some()).count();
        let sim = if a.gpus_simulated { " (simulated GPUs)" } else { "" };
        let sim = match &a.unhealthy {
            Some(why) => format!("{sim}  UNHEALTHY: {why}"),
            None => sim.to_string(),
        };
        let free: Vec<String> = a
            .gpus
            .iter()
            .map(|g| format!("{}:{}MiB{}", g.index, g.free_vram_mib, if g.healthy { "" } else { "!" }))
            .collect();
        println!(
            "{:<16} {:<8} {:<9} {:>5} {:>5}  {}{sim}",
            truncate(&printable(&a.name), 16),
            a.state,
            a.draining,
            busy,
            a.gpus.len(),
            free.join(" ")
        );
        for g in &a.gpus {
            if let Some(q) = &g.quarantine {
                println!("    GPU {} ({}) QUARANTINED for {} s: {}", g.index, g.uuid, q.for_ms / 1000, q.reason);
            }
        }
    }
}

/// `cosmos agents drain|undrain`.
pub fn drain(args: &ClientArgs, name: &str, on: bool) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let verb = if on { "drain" } else { "undrain" };
    let _: serde_json::Value = client.post(&format!("/v1/agents/{name}/{verb}"), &serde_json::json!({}))?;
    println!("{name}: {verb}ed");
    Ok(())
}

/// `cosmos agents undrain NAME --gpu UUID`.
pub fn release_gpu(args: &ClientArgs, name: &str, uuid: &str) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let _: serde_json::Value =
        client.post(&format!("/v1/agents/{name}/gpus/{uuid}/release"), &serde_json::json!({}))?;
    println!("{name}: GPU {uuid} released; it takes work again once the agent confirms");
    Ok(())
}

/// `cosmos status`.
pub fn status(args: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let s: StatusBody = client.get("/v1/status")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let gpus: usize = s.agents.iter().map(|a| a.gpus.len()).sum();
    let busy: usize = s.agents.iter().flat_map(|a| &a.gpus).filter(|g| g.attempt.is_some()).count();
    println!("controller epoch {}  queue {}  GPUs busy {busy}/{gpus}", s.epoch, s.queue_depth);
    if let Some(l) = &s.leader {
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let for_ = elapsed_text(Some(now_ms.saturating_sub(l.since_ms)));
        println!("leader {} (API {}, agents {})  epoch {}  leading for {for_}", l.holder, l.api, l.agents, l.epoch.0);
    }
    println!("jobs: {}", s.jobs.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "));
    print_agents(&s.agents);
    Ok(())
}
