//! The process runtime against real processes, each test in its own temp dir.

use cosmos_agent::core::{ExitStatus, Recovered, RuntimeEvent};
use cosmos_agent::process::{ProcessRuntime, group_exists};
use cosmos_agent::runtime::{EVENT_QUEUE_LEN, Runtime, StartRequest};
use cosmos_agent::supervise::{ExitRecord, Launcher, RecordLog};
use cosmos_proto::spec::{ArtifactRef, OutputArtifact};
use cosmos_proto::{AttemptId, Epoch, JobId, JobSpec, LogStream, Sha256};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

mod common;
use common::*;

fn runtime(root: &Path) -> (ProcessRuntime, mpsc::Receiver<RuntimeEvent>) {
    let (tx, rx) = mpsc::channel(EVENT_QUEUE_LEN);
    let supervisor = Launcher::standalone(env!("CARGO_BIN_EXE_cosmos-job-supervise").into());
    (ProcessRuntime::new(root.to_path_buf(), tx, supervisor), rx)
}

fn request(rt: &ProcessRuntime, id: u64, command: &[&str]) -> StartRequest {
    let attempt_id = AttemptId(id);
    StartRequest {
        attempt_id,
        job_id: JobId(1000 + id),
        epoch: Epoch(1),
        spec: JobSpec::command("test", command.iter().copied()),
        gpu_uuids: vec!["GPU-test-0".into()],
        gpu_indices: vec![0],
        work_dir: rt.attempt_dir(attempt_id),
    }
}

/// The attempt's record file, folded (its start as plain JSON).
fn record(rt: &ProcessRuntime, id: u64) -> Option<RecordLog<serde_json::Value>> {
    let path = rt.attempt_dir(AttemptId(id)).join(cosmos_agent::process::RECORD_LOG);
    cosmos_agent::supervise::read_log(&path).unwrap()
}

/// Waits until the attempt has printed `text` on stdout.
async fn wait_for_output(rx: &mut mpsc::Receiver<RuntimeEvent>, id: AttemptId, seen: &mut Seen, text: &str) {
    let text = text.as_bytes().to_vec();
    watch_until(rx, id, seen, |s| s.stream(LogStream::Stdout).windows(text.len()).any(|w| w == text.as_slice())).await;
}

fn pgid_of(handle: &str) -> i32 {
    handle.strip_prefix("pgid:").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("handle {handle}"))
}

/// Whether a process runs (a zombie does not).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat[stat.rfind(')').unwrap() + 1..].trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Kills a process group when the test ends, however it ends.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0 > 1 {
            unsafe { libc::killpg(self.0, libc::SIGKILL) };
        }
    }
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn exit_codes_are_reported_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, mut rx) = runtime(dir.path());
    rt.start(request(&rt, 1, &["sh", "-c", "exit 0"]));
    rt.start(request(&rt, 2, &["sh", "-c", "exit 3"]));
    let ok = run_to_end(&mut rx, AttemptId(1)).await;
    assert!(ok.started.as_deref().is_some_and(|h| h.starts_with("pgid:")), "{ok:?}");
    assert_eq!(ok.status(), &ExitStatus { code: Some(0), signal: None, oom_killed: false });
    // Attempt 2's events may have been consumed above; its record on disk says how it ended.
    eventually("attempt 2 exits", || record(&rt, 2).is_some_and(|r| r.exited.is_some())).await;
    let log = record(&rt, 2).unwrap();
    assert_eq!(log.exited.unwrap().code, Some(3));
    assert!(log.acknowledged_unix_ms.is_none());
    let record = log.started.expect("the start is recorded");
    assert_eq!(record["attempt_id"], 2);
    assert_eq!(record["job_id"], 1002);
    assert_eq!(record["timeout_ms"], cosmos_proto::spec::DEFAULT_TIMEOUT_MS);
    assert!(record["pgid"].as_i64().unwrap() > 1);

    rt.start(request(&rt, 3, &["sh", "-c", "exit 3"]));
    let failed = run_to_end(&mut rx, AttemptId(3)).await;
    assert_eq!(failed.status().code, Some(3));
}

#[tokio::test]
async fn output_is_streamed_in_order_with_offsets_and_kept_in_files() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, mut rx) = runtime(dir.path());
    let script = "echo out1; echo err1 >&2; echo out2; printf err2 >&2; head -c 200000 /dev/zero | tr '\\0' a";
    rt.start(request(&rt, 1, &["sh", "-c", script]));
    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    assert_eq!(seen.status().code, Some(0));
    let stdout = seen.stream(LogStream::Stdout);
    let stderr = seen.stream(LogStream::Stderr);
    let mut expected = b"out1\nout2\n".to_vec();
    expected.extend(std::iter::repeat_n(b'a', 200_000));
    assert_eq!(stdout, expected, "all of stdout, in order, before the exit");
    assert_eq!(stderr, b"err1\nerr2");
    assert!(seen.logs.iter().filter(|l| l.0 == LogStream::Stdout).count() >= 4, "200 kB comes in several chunks");
    let attempt = rt.attempt_dir(AttemptId(1));
    assert_eq!(std::fs::read(attempt.join("stdout.log")).unwrap(), expected);
    assert_eq!(std::fs::read(attempt.join("stderr.log")).unwrap(), b"err1\nerr2");
}

#[tokio::test]
async fn progress_is_parsed_from_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, mut rx) = runtime(dir.path());
    rt.start(request(&rt, 1, &["sh", "-c", "printf '1/3\\n'; sleep 0.3; printf '2/3\\n'; sleep 0.3; printf '3/3\\n'"]));
    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    // Each change once, in order (lines read together report only the latest).
    assert_eq!(seen.progress.last(), Some(&(3, 3)), "{:?}", seen.progress);
    assert!(seen.progress.windows(2).all(|w| w[0].0 < w[1].0), "{:?}", seen.progress);
    assert!(seen.progress.iter().all(|p| [(1, 3), (2, 3), (3, 3)].contains(p)), "{:?}", seen.progress);

    // tqdm redraws after `\r`, on stderr; a burst read at once reports its latest state.
    rt.start(request(
        &rt,
        2,
        &["sh", "-c", "printf '\\r 10%%|#  | 1/10 [00:01<00:09]\\r 20%%|## | 2/10 [00:02<00:08]' >&2"],
    ));
    let seen = run_to_end(&mut rx, AttemptId(2)).await;
    assert_eq!(seen.progress.last(), Some(&(2, 10)));
}

#[tokio::test]
async fn the_job_sees_exactly_its_gpus_and_its_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, mut rx) = runtime(dir.path());
    let mut req = request(
        &rt,
        7,
        &[
            "sh",
            "-c",
            "printf '%s|%s|%s|%s|%s' \"$CUDA_VISIBLE_DEVICES\" \"$COSMOS_ATTEMPT_ID\" \"$COSMOS_JOB_ID\" \"$EXTRA\" \"$(pwd)\"",
        ],
    );
    req.gpu_indices = vec![3, 1];
    req.gpu_uuids = vec!["GPU-c".into(), "GPU-a".into()];
    req.spec.gpus = 2;
    req.spec.env.insert("EXTRA".into(), "from the spec".into());
    let work_dir = req.work_dir.canonicalize().unwrap_or(req.work_dir.clone());
    rt.start(req);
    let seen = run_to_end(&mut rx, AttemptId(7)).await;
    let out = String::from_utf8(seen.stream(LogStream::Stdout)).unwrap();
    let work_dir = work_dir.canonicalize().unwrap();
    assert_eq!(out, format!("3,1|att-7|job-1007|from the spec|{}", work_dir.display()));
}

#[tokio::test]
async fn a_child_that_handles_sigterm_is_stopped_within_its_grace() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, mut rx) = runtime(dir.path());
    rt.start(request(&rt, 1, &["sh", "-c", "trap 'echo bye; exit 7' TERM; echo ready; while :; do sleep 0.1; done"]));
    let mut seen = Seen::default();
    wait_for_output(&mut rx, AttemptId(1), &mut seen, "ready").await;
    let _guard = KillOnDrop(pgid_of(seen.started.as_deref().unwrap()));
    rt.stop(AttemptId(1), 60_000);
    watch_until(&mut rx, AttemptId(1), &mut seen, |s| s.exit.is_some()).await;
    // Exit code 7 is the trap's: it ended on SIGTERM, not on the kill after the grace.
    assert_eq!(seen.status(), &ExitStatus { code: Some(7), signal: None, oom_killed: false });
    assert!(String::from_utf8_lossy(&seen.stream(LogStream::Stdout)).ends_with("bye\n"));
}

#[tokio::test]
async fn a_child_that_ignores_sigterm_is_killed_with_its_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, mut rx) = runtime(dir.path());
    rt.start(request(&rt, 1, &["sh", "-c", "trap '' TERM; sleep 60 & echo \"grandchild $!\"; wait; wait; wait"]));
    let mut seen = Seen::default();
    wait_for_output(&mut rx, AttemptId(1), &mut seen, "\n").await;
    let pgid = pgid_of(seen.started.as_deref().unwrap());
    let _guard = KillOnDrop(pgid);
    let out = String::from_utf8(seen.stream(LogStream::Stdout)).unwrap();
    let grandchild: i32 = out.trim().strip_prefix("grandchild ").unwrap().parse().unwrap();
    assert!(alive(grandchild));

    rt.stop(AttemptId(1), 300);
    watch_until(&mut rx, AttemptId(1), &mut seen, |s| s.exit.is_some()).await;
    assert_eq!(seen.status(), &ExitStatus { code: None, signal: Some(libc::SIGKILL), oom_killed: false });
    eventually("the grandchild is gone", || !alive(grandchild)).await;
    eventually("no process of the group is left", || !group_exists(pgid)).await;
}

#[tokio::test]
async fn stopping_an_unknown_attempt_reports_it_killed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, mut rx) = runtime(dir.path());
    rt.stop(AttemptId(99), 1_000);
    let seen = run_to_end(&mut rx, AttemptId(99)).await;
    assert_eq!(seen.status().signal, Some(libc::SIGKILL));
}

#[tokio::test]
async fn outputs_are_reported_with_their_digests() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, mut rx) = runtime(dir.path());
    let script = "printf hello > out.txt; mkdir sub; printf world > sub/b.bin; ln -s /etc/hostname leak.txt";
    let mut req = request(&rt, 1, &["sh", "-c", script]);
    for (path, required) in [("out.txt", true), ("sub/b.bin", false), ("missing.txt", false), ("leak.txt", false)] {
        req.spec.outputs.push(OutputArtifact { path: path.into(), required });
    }
    rt.start(req);
    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    let digest = |data: &[u8]| Sha256(sha2::Sha256::digest(data).into());
    let expected = vec![
        ArtifactRef { path: "out.txt".into(), sha256: digest(b"hello"), size_bytes: 5 },
        ArtifactRef { path: "sub/b.bin".into(), sha256: digest(b"world"), size_bytes: 5 },
    ];
    assert_eq!(seen.exit.as_ref().unwrap().1, expected, "present files only; no symlink out of the work dir");
    assert_eq!(
        digest(b"hello").to_string(),
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        "the digest is plain SHA-256"
    );
}

#[tokio::test]
async fn a_job_that_writes_nothing_leaves_only_its_record_and_one_that_delivers_its_log_gets_it_even_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, mut rx) = runtime(dir.path());
    rt.start(request(&rt, 1, &["true"]));
    assert_eq!(run_to_end(&mut rx, AttemptId(1)).await.status().code, Some(0));
    rt.acknowledge(AttemptId(1));
    let root = dir.path().to_path_buf();
    let names = |id: u64| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(root.join(format!("attempts/att-{id}")))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    // Each file is an inode for the file system to allocate: a quiet job makes one.
    assert_eq!(names(1), ["attempt.jsonl"]);
    let log = record(&rt, 1).unwrap();
    assert!(log.started.is_some() && log.exited.is_some() && log.acknowledged_unix_ms.is_some(), "{log:?}");

    let mut req = request(&rt, 2, &["true"]);
    req.spec.outputs.push(OutputArtifact { path: "stdout.log".into(), required: true });
    rt.start(req);
    let seen = run_to_end(&mut rx, AttemptId(2)).await;
    let empty =
        ArtifactRef { path: "stdout.log".into(), sha256: Sha256(sha2::Sha256::digest(b"").into()), size_bytes: 0 };
    assert_eq!(seen.exit.as_ref().unwrap().1, [empty], "an empty result is still a result");
    assert_eq!(names(2), ["attempt.jsonl", "stdout.log"]);
}

#[tokio::test]
async fn the_directories_an_older_agent_left_are_recovered_and_acknowledged_in_their_own_layout() {
    let dir = tempfile::tempdir().unwrap();
    // What an agent before the record file left: `attempt.json`, `exit.json` (by its supervisor), `acknowledged`.
    let legacy = |id: u64, exit: Option<&str>, acknowledged: bool| {
        let attempt = dir.path().join(format!("attempts/att-{id}"));
        std::fs::create_dir_all(&attempt).unwrap();
        let record = serde_json::json!({
            "attempt_id": id, "job_id": 1000 + id, "epoch": 1, "gpu_uuids": ["GPU-test-0"],
            "pid": 999_999, "pgid": 999_999, "started_unix_ms": 1, "timeout_ms": 60_000,
            "work_dir": attempt, "outputs": [], "boot_id": null, "start_ticks": null,
        });
        std::fs::write(attempt.join("attempt.json"), record.to_string()).unwrap();
        if let Some(exit) = exit {
            std::fs::write(attempt.join("exit.json"), exit).unwrap();
        }
        if acknowledged {
            std::fs::write(attempt.join("acknowledged"), b"").unwrap();
        }
        attempt
    };
    let ended = legacy(1, Some("{\"code\": 5, \"signal\": null}"), false);
    legacy(2, Some("{\"code\": 0, \"signal\": null}"), true);
    let vanished = legacy(3, None, false);
    let (mut rt, _rx) = runtime(dir.path());
    let mut recovered = rt.recover();
    recovered.sort_by_key(|r| r.attempt_id);
    let outcomes: Vec<_> = recovered.iter().map(|r| (r.attempt_id, r.job_id, r.exited.clone())).collect();
    let status = |code| Some(ExitStatus { code, signal: None, oom_killed: false });
    assert_eq!(
        outcomes,
        [(AttemptId(1), JobId(1001), status(Some(5))), (AttemptId(3), JobId(1003), status(None))],
        "the ended one with its code, the vanished one lost, the acknowledged one not again"
    );
    assert!(vanished.join("exit.json").exists(), "its loss is recorded in its own layout");
    rt.acknowledge(AttemptId(1));
    assert!(ended.join("acknowledged").exists());
    assert!(!ended.join("attempt.jsonl").exists(), "an old directory is not converted");
    let (mut again, _rx) = runtime(dir.path());
    let left: Vec<AttemptId> = again.recover().iter().map(|r| r.attempt_id).collect();
    assert_eq!(left, [AttemptId(3)]);
}

#[tokio::test]
async fn a_missing_program_fails_to_start_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, mut rx) = runtime(dir.path());
    rt.start(request(&rt, 1, &["/nonexistent/cosmos-no-such-program", "--flag"]));
    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    let (reason, retryable) = seen.start_failed.expect("start failed");
    assert!(!retryable);
    assert!(reason.contains("/nonexistent/cosmos-no-such-program"), "{reason}");
    assert!(reason.contains("not found"), "{reason}");

    let mut req = request(&rt, 2, &["true"]);
    req.spec.image = Some("nvcr.io/nvidia/cosmos:latest".into());
    rt.start(req);
    let seen = run_to_end(&mut rx, AttemptId(2)).await;
    let (reason, retryable) = seen.start_failed.expect("start failed");
    assert!(!retryable);
    assert!(reason.contains("cannot run container images"), "{reason}");
}

#[tokio::test]
async fn a_restarted_runtime_adopts_running_attempts_and_reports_finished_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (mut first, mut rx) = runtime(dir.path());
    let mut long = request(&first, 1, &["sleep", "60"]);
    long.spec.timeout_ms = 3_600_000;
    first.start(long);
    first.start(request(&first, 2, &["sh", "-c", "echo done; exit 3"]));
    let running = run_to_end(&mut rx, AttemptId(2)).await;
    assert_eq!(running.status().code, Some(3));
    let mut seen_long = Seen::default();
    // Attempt 1's start may have been consumed above; its record holds the group.
    eventually("attempt 1 is recorded", || record(&first, 1).is_some_and(|r| r.started.is_some())).await;
    let pgid = record(&first, 1).unwrap().started.unwrap()["pgid"].as_i64().unwrap() as i32;
    let _guard = KillOnDrop(pgid);
    drop(first); // The agent "restarts": the processes stay.
    drop(rx);
    assert!(group_exists(pgid));

    let (mut second, mut rx) = runtime(dir.path());
    let mut recovered = second.recover();
    recovered.sort_by_key(|r| r.attempt_id);
    assert_eq!(recovered.len(), 2, "{recovered:?}");
    let Recovered { attempt_id, job_id, ref gpu_uuids, exited: None, remaining_ms: Some(left), .. } = recovered[0]
    else {
        panic!("attempt 1 is adopted while it runs: {recovered:?}");
    };
    assert_eq!(
        (attempt_id, job_id, gpu_uuids.as_slice()),
        (AttemptId(1), JobId(1001), &["GPU-test-0".to_string()][..])
    );
    assert!(left <= 3_600_000 && left > 3_600_000 - 60_000, "{left}");
    assert_eq!(recovered[1].attempt_id, AttemptId(2));
    assert_eq!(recovered[1].exited, Some(ExitStatus { code: Some(3), signal: None, oom_killed: false }));
    assert_eq!(second.live_attempts(), [AttemptId(1)]);

    // The adopted attempt is stopped like any other; its supervisor records how it ended.
    second.stop(AttemptId(1), 200);
    watch_until(&mut rx, AttemptId(1), &mut seen_long, |s| s.exit.is_some()).await;
    assert_eq!(seen_long.status(), &ExitStatus { code: None, signal: Some(libc::SIGTERM), oom_killed: false });
    assert!(!group_exists(pgid));

    // Acknowledged attempts are not reported again; the others are, now as ended.
    second.acknowledge(AttemptId(2));
    drop(second);
    let (mut third, _rx) = runtime(dir.path());
    let recovered = third.recover();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!(recovered[0].attempt_id, AttemptId(1));
    assert_eq!(recovered[0].exited, Some(ExitStatus { code: None, signal: Some(libc::SIGTERM), oom_killed: false }));
    assert!(dir.path().join("attempts/att-2/stdout.log").exists(), "logs stay on disk");
}

#[tokio::test]
async fn an_attempt_of_an_earlier_boot_is_reported_lost_whatever_its_record_says() {
    let dir = tempfile::tempdir().unwrap();
    let (mut first, mut rx) = runtime(dir.path());
    first.start(request(&first, 1, &["sh", "-c", "echo out > result.txt"]));
    assert_eq!(run_to_end(&mut rx, AttemptId(1)).await.status().code, Some(0));
    drop(first);
    drop(rx);
    // The host "reboots": the records stay, written on a boot that is over.
    let record_path = dir.path().join("attempts/att-1/attempt.jsonl");
    let text = std::fs::read_to_string(&record_path).unwrap();
    let mut lines: Vec<serde_json::Value> =
        text.lines().filter(|l| !l.is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    let start = lines.iter_mut().find_map(|l| l.get_mut("started")).expect("a start line");
    assert!(start["boot_id"].is_string(), "the record names its boot: {start}");
    start["boot_id"] = "an-earlier-boot".into();
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&record_path, text.join("\n")).unwrap();

    let (mut second, _rx) = runtime(dir.path());
    let recovered = second.recover();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    // Its outputs were never synced: after a host crash they may be torn, so it runs again.
    assert_eq!(recovered[0].exited, Some(ExitStatus { code: None, signal: None, oom_killed: false }));
    assert!(recovered[0].outputs.is_empty(), "{recovered:?}");
}

#[tokio::test]
async fn the_jobs_of_a_killed_supervisor_are_killed_and_reported_lost_and_the_next_job_gets_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, mut rx) = runtime(dir.path());
    rt.start(request(&rt, 1, &["sh", "-c", "echo \"job $$\"; sleep 60"]));
    let mut seen = Seen::default();
    wait_for_output(&mut rx, AttemptId(1), &mut seen, "\n").await;
    let job = pgid_of(seen.started.as_deref().unwrap());
    let _guard = KillOnDrop(job);
    let out = String::from_utf8(seen.stream(LogStream::Stdout)).unwrap();
    assert_eq!(out.trim(), format!("job {job}"), "the job leads its own process group");
    let supervisor = rt.supervisor_pid().expect("connected to a supervisor") as i32;
    assert_ne!(job, supervisor);

    // SAFETY: kill(2) on the supervisor this test's runtime started.
    unsafe { libc::kill(supervisor, libc::SIGKILL) };
    watch_until(&mut rx, AttemptId(1), &mut seen, |s| s.exit.is_some()).await;
    assert_eq!(seen.status(), &ExitStatus { code: None, signal: None, oom_killed: false }, "no record: lost");
    eventually("the orphaned job is killed with its group", || !alive(job)).await;
    let exited = record(&rt, 1).unwrap().exited;
    assert_eq!(exited, Some(ExitRecord::default()), "recorded lost: a restarted agent does not look again");

    // The next job starts a new supervisor.
    rt.start(request(&rt, 2, &["sh", "-c", "exit 4"]));
    assert_eq!(run_to_end(&mut rx, AttemptId(2)).await.status().code, Some(4));
    let replacement = rt.supervisor_pid().expect("a new supervisor") as i32;
    assert_ne!(replacement, supervisor);
}

#[tokio::test]
async fn the_supervisor_names_no_gpu_and_holds_none_of_the_agents_files() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, mut rx) = runtime(dir.path());
    // A descriptor the agent holds without close-on-exec, as a careless library might leave one.
    let leaked_path = dir.path().join("agent-private-file");
    let leaked = std::fs::File::create(&leaked_path).unwrap();
    let leaked_fd = std::os::fd::AsRawFd::as_raw_fd(&leaked);
    // SAFETY: clears FD_CLOEXEC on a descriptor this test owns.
    unsafe { libc::fcntl(leaked_fd, libc::F_SETFD, 0) };
    rt.start(request(&rt, 1, &["sh", "-c", "echo ready; sleep 60"]));
    let mut seen = Seen::default();
    wait_for_output(&mut rx, AttemptId(1), &mut seen, "ready").await;
    let _guard = KillOnDrop(pgid_of(seen.started.as_deref().unwrap()));
    let supervisor = rt.supervisor_pid().expect("connected to a supervisor");

    let environ = std::fs::read(format!("/proc/{supervisor}/environ")).unwrap();
    let vars: Vec<String> = environ.split(|&b| b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
    // Each job's variables are its own, given with its start.
    assert!(
        vars.iter().all(|v| !v.starts_with("CUDA_VISIBLE_DEVICES=") && !v.starts_with("COSMOS_ATTEMPT_ID=")),
        "{vars:?}"
    );
    let open: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{supervisor}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .collect();
    assert!(!open.contains(&leaked_path), "the supervisor holds the agent's file: {open:?}");
    drop(leaked);
}

#[tokio::test]
async fn a_supervisor_with_no_agent_and_no_job_exits() {
    let dir = tempfile::tempdir().unwrap();
    let (mut rt, mut rx) = runtime(dir.path());
    rt.start(request(&rt, 1, &["true"]));
    assert_eq!(run_to_end(&mut rx, AttemptId(1)).await.status().code, Some(0));
    let supervisor = rt.supervisor_pid().expect("connected to a supervisor") as i32;
    drop(rt);
    let socket = dir.path().join(cosmos_agent::supervise::SOCKET_FILE);
    assert!(socket.exists());
    let deadline = std::time::Instant::now()
        + Duration::from_millis(cosmos_agent::supervise::IDLE_EXIT_MS)
        + Duration::from_secs(30);
    while alive(supervisor) {
        assert!(std::time::Instant::now() < deadline, "the idle supervisor {supervisor} never exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!socket.exists(), "an exited supervisor removes its socket");
}
