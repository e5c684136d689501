//! The agent core through its public API: what runs, what is reported, when a stop turns into a kill.

use cosmos_agent_core::core::*;
use cosmos_agent_core::exit::{QUOTED_BYTES_MAX, QUOTED_LINE_BYTES_MAX, QUOTED_LINES_MAX, error_tail};
use cosmos_proto::spec::OutputArtifact;
use cosmos_proto::*;
use cosmos_proto::{Sha256, TraceContext};

const GPU: &str = "GPU-0";
const ATT: AttemptId = AttemptId(7);

fn core() -> AgentCore {
    let gpu = GpuInfo { index: 0, uuid: GPU.into(), name: "fake".into(), total_vram_bytes: 80 << 30 };
    let config = AgentConfig { upload_timeout_ms: 60_000, ..AgentConfig::default() };
    let mut core = AgentCore::new(0, config, vec![gpu], true, "sim", 1, Vec::new());
    core.connected(0, &mut Vec::new());
    core
}

fn spec(inputs: usize) -> JobSpec {
    let mut spec = JobSpec::command("t", ["true"]);
    spec.gpus = 1;
    spec.timeout_ms = 10_000;
    spec.inputs = (0..inputs)
        .map(|i| InputArtifact { sha256: Sha256([i as u8; 32]), size_bytes: 3, path: format!("in/{i}") })
        .collect();
    spec.outputs = vec![OutputArtifact { path: "out/model".into(), required: true }];
    spec
}

fn assign(core: &mut AgentCore, now_ms: u64, spec: JobSpec) -> Vec<Output> {
    let mut out = Vec::new();
    let msg = ControllerMsg::Assign(Box::new(Assign {
        epoch: Epoch(1),
        attempt_id: ATT,
        job_id: JobId(1),
        spec,
        gpu_uuids: vec![GPU.into()],
        trace: TraceContext::default(),
    }));
    core.on_message(now_ms, msg, &mut out);
    out
}

fn artifact() -> ArtifactRef {
    ArtifactRef { path: "out/model".into(), sha256: Sha256([9; 32]), size_bytes: 5 }
}

fn clean_exit(core: &mut AgentCore, now_ms: u64, outputs: Vec<ArtifactRef>) -> Vec<Output> {
    let mut out = Vec::new();
    let status = ExitStatus { code: Some(0), signal: None, oom_killed: false };
    core.on_runtime(now_ms, RuntimeEvent::Exited { attempt_id: ATT, status, outputs }, &mut out);
    out
}

fn finished(out: &[Output]) -> Option<AttemptOutcome> {
    out.iter().find_map(|o| match o {
        Output::Send(AgentMsg::AttemptFinished { attempt_id, outcome }) if *attempt_id == ATT => Some(outcome.clone()),
        _ => None,
    })
}

fn phase(core: &AgentCore) -> Option<AttemptPhase> {
    core.reports().into_iter().find(|r| r.attempt_id == ATT).map(|r| r.phase)
}

#[test]
fn outputs_of_an_attempt_that_ended_while_no_agent_ran_are_delivered_before_success() {
    let gpu = GpuInfo { index: 0, uuid: GPU.into(), name: "fake".into(), total_vram_bytes: 80 << 30 };
    let recovered = Recovered {
        attempt_id: ATT,
        job_id: JobId(1),
        gpu_uuids: vec![GPU.into()],
        exited: Some(ExitStatus { code: Some(0), signal: None, oom_killed: false }),
        remaining_ms: None,
        outputs: vec![artifact()],
    };
    let mut core = AgentCore::new(0, AgentConfig::default(), vec![gpu], true, "sim", 1, vec![recovered]);
    let mut out = Vec::new();
    core.connected(0, &mut out);
    let hello = out.iter().position(|o| matches!(o, Output::Send(AgentMsg::Hello(_))));
    let upload = out.iter().position(|o| matches!(o, Output::Upload { attempt_id: ATT, .. }));
    assert!(hello.is_some() && upload > hello, "hello first, then the delivery: {out:?}");
    assert!(matches!(phase(&core), Some(AttemptPhase::Running { .. })), "not finished until delivered");
    assert_eq!(finished(&out), None);
    // A later reconnect does not start a second delivery: the engine retries the first.
    core.disconnected();
    let mut again = Vec::new();
    core.connected(10, &mut again);
    assert!(!again.iter().any(|o| matches!(o, Output::Upload { .. })), "{again:?}");
    let mut out = Vec::new();
    core.on_uploaded(20, ATT, Ok(()), &mut out);
    assert_eq!(finished(&out), Some(AttemptOutcome::Succeeded { outputs: vec![artifact()] }));
}

/// A running attempt whose container exited cleanly with an output, now uploading.
fn uploading(core: &mut AgentCore) -> Vec<Output> {
    assign(core, 0, spec(0));
    let mut out = Vec::new();
    core.on_runtime(1, RuntimeEvent::Started { attempt_id: ATT, handle: "h".into() }, &mut out);
    core.on_runtime(2, RuntimeEvent::Progress { attempt_id: ATT, step: 3, total: 10 }, &mut out);
    clean_exit(core, 100, vec![artifact()])
}

#[test]
fn without_inputs_it_starts_at_once() {
    let mut core = core();
    let out = assign(&mut core, 0, spec(0));
    assert!(matches!(out.as_slice(), [Output::Start { attempt_id: ATT, .. }]), "{out:?}");
}

#[test]
fn with_inputs_it_stages_first_and_starts_once_staged() {
    let mut core = core();
    let out = assign(&mut core, 0, spec(2));
    assert!(matches!(out.as_slice(), [Output::Stage { attempt_id: ATT, inputs }] if inputs.len() == 2), "{out:?}");
    assert_eq!(phase(&core), Some(AttemptPhase::Starting));
    assert!(core.live_attempts().any(|(id, gpus)| id == ATT && gpus == [GPU.to_string()]));
    let mut out = Vec::new();
    core.on_staged(5, ATT, Ok(()), &mut out);
    assert!(matches!(out.as_slice(), [Output::Start { attempt_id: ATT, gpu_uuids, .. }] if gpus_ok(gpu_uuids)));
    // A duplicate answer changes nothing.
    let mut out = Vec::new();
    core.on_staged(6, ATT, Ok(()), &mut out);
    assert!(out.is_empty());
}

fn gpus_ok(gpus: &[String]) -> bool {
    gpus == [GPU.to_string()]
}

#[test]
fn the_gpus_stay_claimed_while_staging() {
    let mut core = core();
    assign(&mut core, 0, spec(1));
    let mut out = Vec::new();
    let msg = ControllerMsg::Assign(Box::new(Assign {
        epoch: Epoch(1),
        attempt_id: AttemptId(8),
        job_id: JobId(2),
        spec: spec(0),
        gpu_uuids: vec![GPU.into()],
        trace: TraceContext::default(),
    }));
    core.on_message(1, msg, &mut out);
    assert!(matches!(
        out.as_slice(),
        [Output::Send(AgentMsg::AttemptFinished { outcome: AttemptOutcome::Rejected { .. }, .. })]
    ));
}

#[test]
fn failed_staging_finishes_the_attempt_with_its_retryability() {
    for retryable in [true, false] {
        let mut core = core();
        assign(&mut core, 0, spec(1));
        let mut out = Vec::new();
        core.on_staged(
            5,
            ATT,
            Err(StageFailure { reason: "digest mismatch".into(), retry: cosmos_proto::Retry::when(retryable) }),
            &mut out,
        );
        let Some(AttemptOutcome::Failed { exit_code: None, reason, retry: r }) = finished(&out) else {
            panic!("{out:?}")
        };
        assert!(reason.starts_with("staging inputs failed: digest mismatch"), "{reason}");
        assert_eq!(r.is_retryable(), retryable);
        assert!(!out.iter().any(|o| matches!(o, Output::Start { .. })));
        assert_eq!(core.live_attempts().count(), 0);
        assert!(matches!(phase(&core), Some(AttemptPhase::Finished(_))), "kept until acknowledged");
    }
}

#[test]
fn cancel_while_staging_aborts_it_and_finishes_cancelled_without_a_stop() {
    let mut core = core();
    assign(&mut core, 0, spec(1));
    let mut out = Vec::new();
    core.on_message(3, ControllerMsg::Cancel { attempt_id: ATT, grace_ms: 1_000 }, &mut out);
    assert!(out.contains(&Output::AbortStage { attempt_id: ATT }));
    assert!(!out.iter().any(|o| matches!(o, Output::Stop { .. })));
    assert_eq!(finished(&out), Some(AttemptOutcome::Cancelled));
    // The blob engine's late answer is ignored.
    let mut out = Vec::new();
    core.on_staged(4, ATT, Ok(()), &mut out);
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn staging_counts_toward_the_timeout() {
    let mut core = core();
    assign(&mut core, 0, spec(1));
    let mut out = Vec::new();
    core.tick(9_999, &mut out);
    assert!(finished(&out).is_none());
    let mut out = Vec::new();
    core.tick(10_000, &mut out);
    assert!(out.contains(&Output::AbortStage { attempt_id: ATT }));
    let Some(AttemptOutcome::Failed { reason, retry: cosmos_proto::Retry::Retryable, .. }) = finished(&out) else {
        panic!("{out:?}")
    };
    assert!(reason.contains("timed out while staging inputs"), "{reason}");
}

#[test]
fn fencing_while_staging_aborts_it() {
    let mut core = core();
    assign(&mut core, 0, spec(1));
    let mut out = Vec::new();
    core.on_message(3, ControllerMsg::Reconcile { epoch: Epoch(1), keep: Vec::new() }, &mut out);
    assert!(out.contains(&Output::AbortStage { attempt_id: ATT }));
    assert_eq!(finished(&out), Some(AttemptOutcome::Cancelled));
    assert_eq!(core.live_attempts().count(), 0);
}

#[test]
fn a_clean_exit_with_outputs_waits_for_their_delivery() {
    let mut core = core();
    let out = uploading(&mut core);
    assert_eq!(out, vec![Output::Upload { attempt_id: ATT, outputs: vec![artifact()] }]);
    assert_eq!(phase(&core), Some(AttemptPhase::Running { step: 10, total: 10 }));
    assert!(core.live_attempts().any(|(id, _)| id == ATT), "GPUs held until the controller hears the outcome");
    // Duplicate exit news changes nothing.
    assert!(clean_exit(&mut core, 101, vec![artifact()]).is_empty());
    let mut out = Vec::new();
    core.on_uploaded(200, ATT, Ok(()), &mut out);
    assert_eq!(finished(&out), Some(AttemptOutcome::Succeeded { outputs: vec![artifact()] }));
    assert_eq!(core.live_attempts().count(), 0);
    let mut out = Vec::new();
    core.on_uploaded(201, ATT, Ok(()), &mut out);
    assert!(out.is_empty(), "a late answer is ignored");
}

fn exit_with(core: &mut AgentCore, code: i32, stderr: &[u8]) -> Option<AttemptOutcome> {
    let mut out = Vec::new();
    let log = RuntimeEvent::Log { attempt_id: ATT, stream: LogStream::Stderr, offset: 0, data: stderr.to_vec() };
    core.on_runtime(1, log, &mut out);
    let status = ExitStatus { code: Some(code), signal: None, oom_killed: false };
    core.on_runtime(2, RuntimeEvent::Exited { attempt_id: ATT, status, outputs: Vec::new() }, &mut out);
    finished(&out)
}

#[test]
fn a_jobs_own_terminal_exit_code_is_not_retried_and_its_message_is_quoted() {
    let stderr = b" 10%|#   | 1/10\rpython: can't open file 'x.py': [Errno 2] No such file or directory\n\n";
    let mut terminal = core();
    let mut s = spec(0);
    s.terminal_exit_codes = vec![2];
    assign(&mut terminal, 0, s);
    let Some(AttemptOutcome::Failed { exit_code: Some(2), reason, retry: cosmos_proto::Retry::Terminal }) =
        exit_with(&mut terminal, 2, stderr)
    else {
        panic!("exit 2 is terminal for this job");
    };
    assert!(reason.contains("not retried"), "{reason}");
    assert!(
        reason.ends_with("its last error output: python: can't open file 'x.py': [Errno 2] No such file or directory")
    );
    // Without the job saying so, 2 is an ordinary failure, retried.
    let mut plain = core();
    assign(&mut plain, 0, spec(0));
    let outcome = exit_with(&mut plain, 2, b"ValueError: boom\n");
    let Some(AttemptOutcome::Failed { retry: cosmos_proto::Retry::Retryable, reason, .. }) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(reason.ends_with("; its last error output: ValueError: boom"), "{reason}");
}

/// What torchrun (torch 2.x) writes when its worker exits 2: its log line,
/// its own traceback ending in ChildFailedError, and the failure report.
const TORCHRUN_WORKER_EXIT_2: &str = "python: can't open file '/workspace/x.py': [Errno 2] No such file or directory
E1201 10:00:00.123000 41 torch/distributed/elastic/multiprocessing/api.py:869] failed (exitcode: 2) local_rank: 0 (pid: 42) of binary: /usr/bin/python
Traceback (most recent call last):
  File \"/usr/local/bin/torchrun\", line 8, in <module>
sys.exit(main())
  File \"/usr/local/lib/python3.10/dist-packages/torch/distributed/launcher/api.py\", line 263, in launch_agent
raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
/workspace/x.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_10:00:00
  host      : gpu-1
  rank      : 0 (local_rank: 0)
  exitcode  : 2 (pid: 42)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
";

#[test]
fn torchruns_exit_1_is_judged_by_the_exit_code_of_the_worker_it_blames() {
    let mut terminal = core();
    let mut s = spec(0);
    s.terminal_exit_codes = vec![2];
    assign(&mut terminal, 0, s);
    let outcome = exit_with(&mut terminal, 1, TORCHRUN_WORKER_EXIT_2.as_bytes());
    let Some(AttemptOutcome::Failed { exit_code: Some(1), reason, retry: cosmos_proto::Retry::Terminal }) = outcome
    else {
        panic!("a worker's exit 2 under torchrun is terminal for this job: {outcome:?}");
    };
    assert!(reason.contains("the worker it blames exited with code 2"), "{reason}");
    assert!(
        reason.ends_with(
            "its last error output: python: can't open file '/workspace/x.py': [Errno 2] No such file or directory"
        ),
        "{reason}"
    );
    // A worker that failed otherwise (exit 1: an exception) is retried.
    let mut retried = core();
    let mut s = spec(0);
    s.terminal_exit_codes = vec![2];
    assign(&mut retried, 0, s);
    let other = TORCHRUN_WORKER_EXIT_2.replace("exitcode  : 2", "exitcode  : 1");
    let outcome = exit_with(&mut retried, 1, other.as_bytes());
    let Some(AttemptOutcome::Failed { retry: cosmos_proto::Retry::Retryable, .. }) = outcome else {
        panic!("{outcome:?}")
    };
}

#[test]
fn the_stderr_tail_is_bounded() {
    let mut noisy = core();
    assign(&mut noisy, 0, spec(0));
    let mut noise = vec![b'x'; 3 * STDERR_TAIL_BYTES];
    noise.extend_from_slice(b"\nlast words\n");
    let outcome = exit_with(&mut noisy, 1, &noise);
    let Some(AttemptOutcome::Failed { reason, .. }) = outcome else { panic!("{outcome:?}") };
    let first = reason.lines().next().unwrap();
    assert!(first.ends_with("; its last error output: last words"), "{reason}");
    assert!(reason.len() < QUOTED_BYTES_MAX + 400, "{}", reason.len());
    let mut long = core();
    assign(&mut long, 0, spec(0));
    let outcome = exit_with(&mut long, 1, &vec![b'y'; 3 * STDERR_TAIL_BYTES]);
    let Some(AttemptOutcome::Failed { reason, .. }) = outcome else { panic!("{outcome:?}") };
    assert!(reason.len() < QUOTED_LINE_BYTES_MAX + 200, "{}", reason.len());
}

#[test]
fn a_failure_quotes_the_last_lines_of_stderr_as_a_terminal_shows_them() {
    let mut failing = core();
    assign(&mut failing, 0, spec(0));
    let stderr = "loading\n  0%|          | 0/35\r  3%|▎         | 1/35\r\n\
                  Traceback (most recent call last):\n  File \"transfer.py\", line 9, in <module>\n    main()\n\
                  \n  File \"model.py\", line 3, in main\n    x.cuda()\nRuntimeError: CUDA out of memory\n\n";
    let outcome = exit_with(&mut failing, 1, stderr.as_bytes());
    let Some(AttemptOutcome::Failed { reason, .. }) = outcome else { panic!("{outcome:?}") };
    let lines: Vec<&str> = reason.lines().collect();
    assert!(lines[0].ends_with("see its logs; its last error output: RuntimeError: CUDA out of memory"), "{reason}");
    assert_eq!(lines[1], format!("the last {QUOTED_LINES_MAX} lines of its stderr:"), "{reason}");
    assert_eq!(
        &lines[2..],
        [
            "    File \"transfer.py\", line 9, in <module>",
            "      main()",
            "    File \"model.py\", line 3, in main",
            "      x.cuda()",
            "  RuntimeError: CUDA out of memory",
        ],
        "the last lines, oldest first, blank ones out: {reason}"
    );
    // A progress bar's redraws leave one line, its last.
    assert_eq!(error_tail("a\n 0%| 0/3\r 33%| 1/3\r\nb\n", |_| false), ["a", " 33%| 1/3", "b"]);
    // Long lines stop the quote at its byte bound; the last line is always there.
    let long = format!("{}\n{}\nend\n", "p".repeat(1500), "q".repeat(1500));
    let tail = error_tail(&long, |_| false);
    assert_eq!(tail.len(), 2, "{tail:?}");
    assert_eq!(tail[1], "end");
    assert!(tail.iter().map(String::len).sum::<usize>() <= QUOTED_BYTES_MAX);
}

#[test]
fn a_clean_exit_without_outputs_succeeds_at_once() {
    let mut core = core();
    let mut s = spec(0);
    s.outputs.clear();
    assign(&mut core, 0, s);
    let out = clean_exit(&mut core, 5, Vec::new());
    assert_eq!(finished(&out), Some(AttemptOutcome::Succeeded { outputs: Vec::new() }));
}

#[test]
fn a_missing_required_output_fails_without_uploading() {
    let mut core = core();
    assign(&mut core, 0, spec(0));
    let other = ArtifactRef { path: "out/other".into(), ..artifact() };
    let out = clean_exit(&mut core, 5, vec![other]);
    assert!(!out.iter().any(|o| matches!(o, Output::Upload { .. })));
    assert!(matches!(finished(&out), Some(AttemptOutcome::Failed { retry: cosmos_proto::Retry::Terminal, .. })));
}

#[test]
fn an_undelivered_output_fails_the_attempt_retryably() {
    let mut core = core();
    uploading(&mut core);
    let mut out = Vec::new();
    core.on_uploaded(200, ATT, Err("controller refused: disk full".into()), &mut out);
    let Some(AttemptOutcome::Failed { exit_code: Some(0), reason, retry: cosmos_proto::Retry::Retryable }) =
        finished(&out)
    else {
        panic!("{out:?}")
    };
    assert!(reason.contains("could not be delivered to the controller: controller refused"), "{reason}");
}

#[test]
fn cancel_while_uploading_aborts_it_and_finishes_cancelled() {
    let mut core = core();
    uploading(&mut core);
    let mut out = Vec::new();
    core.on_message(150, ControllerMsg::Cancel { attempt_id: ATT, grace_ms: 1_000 }, &mut out);
    assert!(out.contains(&Output::AbortUpload { attempt_id: ATT }));
    assert!(!out.iter().any(|o| matches!(o, Output::Stop { .. })));
    assert_eq!(finished(&out), Some(AttemptOutcome::Cancelled));
}

#[test]
fn fencing_while_uploading_aborts_it() {
    let mut core = core();
    uploading(&mut core);
    let mut out = Vec::new();
    core.on_message(150, ControllerMsg::Reconcile { epoch: Epoch(1), keep: Vec::new() }, &mut out);
    assert!(out.contains(&Output::AbortUpload { attempt_id: ATT }));
    assert_eq!(finished(&out), Some(AttemptOutcome::Cancelled));
}

#[test]
fn the_job_timeout_does_not_apply_while_uploading_but_the_upload_bound_does() {
    let mut core = core();
    uploading(&mut core);
    let mut out = Vec::new();
    core.tick(20_000, &mut out);
    assert!(finished(&out).is_none(), "past the job's 10 s timeout: {out:?}");
    assert!(!out.iter().any(|o| matches!(o, Output::Stop { .. } | Output::AbortUpload { .. })));
    let mut out = Vec::new();
    core.tick(100 + 60_000, &mut out);
    assert!(out.contains(&Output::AbortUpload { attempt_id: ATT }));
    assert!(matches!(
        finished(&out),
        Some(AttemptOutcome::Failed { exit_code: Some(0), retry: cosmos_proto::Retry::Retryable, .. })
    ));
}

#[test]
fn blob_work_survives_a_reconnect_and_nothing_is_reissued() {
    let mut core = core();
    assign(&mut core, 0, spec(1));
    core.disconnected();
    let mut out = Vec::new();
    core.connected(50, &mut out);
    let [Output::Send(AgentMsg::Hello(hello))] = out.as_slice() else { panic!("{out:?}") };
    assert_eq!(hello.attempts.len(), 1);
    assert_eq!(hello.attempts[0].phase, AttemptPhase::Starting);
    let mut out = Vec::new();
    core.on_staged(60, ATT, Ok(()), &mut out);
    assert!(matches!(out.as_slice(), [Output::Start { .. }]));

    let mut core = self::core();
    uploading(&mut core);
    core.disconnected();
    let mut out = Vec::new();
    core.connected(150, &mut out);
    let [Output::Send(AgentMsg::Hello(hello))] = out.as_slice() else { panic!("{out:?}") };
    assert_eq!(hello.attempts[0].phase, AttemptPhase::Running { step: 10, total: 10 });
}

#[test]
fn a_foreign_process_arriving_during_an_attempt_is_not_its_leak() {
    let mut core = core();
    let sample = |used: u64, foreign: u64| {
        let info = GpuInfo { index: 0, uuid: GPU.into(), name: "fake".into(), total_vram_bytes: 80 << 30 };
        vec![GpuUsage { used_vram_bytes: used, foreign_vram_bytes: foreign, ..GpuUsage::idle(&info) }]
    };
    core.on_gpu_sample(0, sample(1 << 30, 1 << 30), &mut Vec::new());
    uploading(&mut core);
    // Another user's process took 5 GiB meanwhile; ours is all gone.
    let bound = core.config().vram_release_bound_ms;
    let mut out = Vec::new();
    core.on_gpu_sample(100 + bound, sample(6 << 30, 6 << 30), &mut out);
    assert!(!out.iter().any(|o| matches!(o, Output::Send(AgentMsg::GpuFault { .. }))), "{out:?}");
    assert_eq!(core.faulty_gpus().count(), 0);
}

#[test]
fn memory_must_drain_from_the_exit_not_from_the_delivery() {
    let mut core = core();
    let sample = |used| {
        vec![GpuUsage {
            used_vram_bytes: used,
            ..GpuUsage::idle(&GpuInfo { index: 0, uuid: GPU.into(), name: "fake".into(), total_vram_bytes: 80 << 30 })
        }]
    };
    core.on_gpu_sample(0, sample(0), &mut Vec::new());
    uploading(&mut core);
    let bound = core.config().vram_release_bound_ms;
    let mut out = Vec::new();
    core.on_gpu_sample(100 + bound, sample(10 << 30), &mut out);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Send(AgentMsg::GpuFault { fault: GpuFault::VramNotReleased { .. }, .. }))),
        "{out:?}"
    );
}

fn reading(used: u64, processes: Vec<GpuProcess>) -> Vec<GpuReading> {
    let info = GpuInfo { index: 0, uuid: GPU.into(), name: "fake".into(), total_vram_bytes: 80 << 30 };
    let foreign = processes.iter().filter(|p| p.attempt_id.is_none()).filter_map(|p| p.used_bytes).sum();
    let usage = GpuUsage { used_vram_bytes: used, foreign_vram_bytes: foreign, ..GpuUsage::idle(&info) };
    vec![GpuReading { usage, processes, lost: None }]
}

fn ours(pid: u32, bytes: u64) -> GpuProcess {
    GpuProcess { pid, used_bytes: Some(bytes), attempt_id: Some(ATT) }
}

fn heartbeat_gpu(core: &mut AgentCore, now_ms: u64) -> GpuUsage {
    let mut out = Vec::new();
    // The link is alive: the heartbeat is due rather than a reconnect.
    core.on_message(now_ms, ControllerMsg::HeartbeatAck { seq: 0 }, &mut out);
    core.tick(now_ms, &mut out);
    out.into_iter()
        .find_map(|o| match o {
            Output::Send(AgentMsg::Heartbeat(hb)) => Some(hb.gpus[0].clone()),
            _ => None,
        })
        .expect("a heartbeat is due")
}

fn faults(out: &[Output]) -> Vec<GpuFault> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send(AgentMsg::GpuFault { fault, .. }) => Some(fault.clone()),
            _ => None,
        })
        .collect()
}

fn recovered(out: &[Output]) -> bool {
    out.iter().any(|o| matches!(o, Output::Send(AgentMsg::GpuRecovered { .. })))
}

#[test]
fn an_attempts_surviving_process_is_killed_before_its_gpu_is_quarantined_and_it_returns_once_gone() {
    let mut core = core();
    core.on_gpu_readings(0, reading(0, Vec::new()), &mut Vec::new());
    uploading(&mut core);
    let bound = core.config().vram_release_bound_ms;
    let recheck = core.config().stray_kill_recheck_ms;
    let mut out = Vec::new();
    core.on_gpu_readings(100 + bound, reading(10 << 30, vec![ours(99, 10 << 30)]), &mut out);
    assert_eq!(out, vec![Output::KillStrays { attempt_id: ATT, pids: vec![99] }]);
    // It survived the kill.
    let mut out = Vec::new();
    core.on_gpu_readings(100 + bound + recheck - 1, reading(10 << 30, vec![ours(99, 10 << 30)]), &mut out);
    assert!(out.is_empty(), "{out:?}");
    let mut out = Vec::new();
    core.on_gpu_readings(100 + bound + recheck, reading(10 << 30, vec![ours(99, 10 << 30)]), &mut out);
    assert!(matches!(faults(&out).as_slice(), [GpuFault::VramNotReleased { attempt_id: ATT, .. }]), "{out:?}");
    let gpu = heartbeat_gpu(&mut core, 100 + bound + recheck + 2_000);
    assert!(!gpu.healthy);
    let q = gpu.quarantine.expect("quarantined");
    assert_eq!((q.held_bytes, q.pids.clone(), q.for_ms), (10 << 30, vec![99], 2_000));
    assert!(
        q.reason.contains("10.0 GiB") && q.reason.contains("99") && q.reason.contains("survived a kill"),
        "{}",
        q.reason
    );
    // Memory freed but its process still listed: not clean yet.
    let mut out = Vec::new();
    core.on_gpu_readings(200_000, reading(0, vec![ours(99, 0)]), &mut out);
    assert!(!recovered(&out));
    let mut out = Vec::new();
    core.on_gpu_readings(200_100, reading(0, Vec::new()), &mut out);
    assert!(recovered(&out), "{out:?}");
    let gpu = heartbeat_gpu(&mut core, 210_000);
    assert!(gpu.healthy && gpu.quarantine.is_none(), "{gpu:?}");
}

#[test]
fn memory_held_with_no_process_listed_quarantines_without_a_kill_and_returns_when_freed() {
    let mut core = core();
    core.on_gpu_readings(0, reading(1 << 30, Vec::new()), &mut Vec::new());
    uploading(&mut core);
    let bound = core.config().vram_release_bound_ms;
    let mut out = Vec::new();
    core.on_gpu_readings(100 + bound, reading(5 << 30, Vec::new()), &mut out);
    assert!(!out.iter().any(|o| matches!(o, Output::KillStrays { .. })), "{out:?}");
    let [GpuFault::VramNotReleased { baseline_bytes, held_bytes, .. }] = faults(&out)[..] else { panic!("{out:?}") };
    assert_eq!((baseline_bytes, held_bytes), (1 << 30, 5 << 30));
    let q = heartbeat_gpu(&mut core, 100 + bound + 1_000).quarantine.expect("quarantined");
    assert!(q.reason.contains("4.0 GiB") && q.reason.contains("no process of it listed"), "{}", q.reason);
    assert!(q.pids.is_empty());
    let mut out = Vec::new();
    core.on_gpu_readings(100 + bound + 3_000, reading(1 << 30, Vec::new()), &mut out);
    assert!(recovered(&out), "{out:?}");
}

#[test]
fn a_foreign_process_holding_memory_after_an_attempt_is_not_its_leak() {
    let mut core = core();
    core.on_gpu_readings(0, reading(0, Vec::new()), &mut Vec::new());
    uploading(&mut core);
    let bound = core.config().vram_release_bound_ms;
    let foreign = GpuProcess { pid: 5, used_bytes: Some(20 << 30), attempt_id: None };
    let mut out = Vec::new();
    core.on_gpu_readings(100 + bound, reading(20 << 30, vec![foreign]), &mut out);
    assert!(faults(&out).is_empty() && !out.iter().any(|o| matches!(o, Output::KillStrays { .. })), "{out:?}");
    assert!(heartbeat_gpu(&mut core, 100 + bound + 1_000).healthy);
}

#[test]
fn critical_xids_quarantine_until_an_operator_releases_the_gpu_and_application_ones_do_not() {
    let mut core = core();
    for xid in APPLICATION_XIDS {
        let mut out = Vec::new();
        assert!(!core.on_gpu_xid(10, GPU, *xid, &mut out));
        assert!(out.is_empty(), "Xid {xid}: {out:?}");
    }
    let mut out = Vec::new();
    assert!(core.on_gpu_xid(10, GPU, 79, &mut out));
    assert!(
        matches!(finished(&assign(&mut core, 11, spec(0))), Some(AttemptOutcome::Rejected { reason }) if reason.contains("faulty")),
        "no work on a quarantined GPU"
    );
    assert!(matches!(faults(&out).as_slice(), [GpuFault::Hardware { detail }] if detail.contains("Xid 79")), "{out:?}");
    // Clean memory does not bring back a GPU with a hardware fault.
    let mut out = Vec::new();
    core.on_gpu_readings(20, reading(0, Vec::new()), &mut out);
    assert!(!recovered(&out));
    let q = heartbeat_gpu(&mut core, 2_000).quarantine.expect("quarantined");
    assert!(q.reason.contains("undrain"), "{}", q.reason);
    let mut out = Vec::new();
    core.on_message(3_000, ControllerMsg::ReleaseGpu { gpu_uuid: GPU.into() }, &mut out);
    assert!(recovered(&out), "{out:?}");
    assert!(heartbeat_gpu(&mut core, 5_000).healthy);
}

#[test]
fn a_lost_gpu_is_quarantined_once() {
    let mut core = core();
    let lost = |core: &mut AgentCore, now| {
        let mut r = reading(0, Vec::new());
        r[0].lost = Some("NVML: GPU is lost".into());
        let mut out = Vec::new();
        core.on_gpu_readings(now, r, &mut out);
        out
    };
    let out = lost(&mut core, 10);
    assert!(matches!(faults(&out).as_slice(), [GpuFault::Hardware { detail }] if detail.contains("lost")), "{out:?}");
    assert!(lost(&mut core, 20).is_empty(), "reported once");
    assert!(!heartbeat_gpu(&mut core, 2_000).healthy);
}

/// Ticks 1 ms before the core's next deadline (nothing may happen, and the
/// deadline stays), then at it (something must); returns when, and what.
fn tick_through_deadline(core: &mut AgentCore) -> (u64, Vec<Output>) {
    let due = core.next_deadline_ms().expect("a deadline is pending");
    let mut out = Vec::new();
    core.tick(due - 1, &mut out);
    assert!(out.is_empty(), "a tick 1 ms before {due} did work: {out:?}");
    assert_eq!(core.next_deadline_ms(), Some(due), "a tick 1 ms early moved the deadline");
    core.tick(due, &mut out);
    assert!(!out.is_empty(), "nothing was due at {due}");
    (due, out)
}

#[test]
fn the_link_wakes_the_core_for_heartbeats_until_acks_stop_then_never() {
    let mut core = core();
    let (heartbeat, ack) = (core.config().heartbeat_interval_ms, core.config().ack_timeout_ms);
    let mut at = Vec::new();
    loop {
        let (due, out) = tick_through_deadline(&mut core);
        at.push(due);
        if out.contains(&Output::Reconnect) {
            break;
        }
        assert!(matches!(out.as_slice(), [Output::Send(AgentMsg::Heartbeat(_))]), "{out:?}");
    }
    let beats: Vec<u64> = (1..ack / heartbeat).map(|n| n * heartbeat).collect();
    assert_eq!(at, [beats, vec![ack]].concat());
    assert_eq!(core.next_deadline_ms(), None, "no link, no attempt: nothing to wake for");
}

#[test]
fn an_attempts_timeout_its_forced_kill_and_its_gpus_release_bound_each_wake_the_core() {
    let mut core = core();
    core.disconnected();
    assign(&mut core, 0, spec(0));
    core.on_runtime(1, RuntimeEvent::Started { attempt_id: ATT, handle: "h".into() }, &mut Vec::new());
    let (due, out) = tick_through_deadline(&mut core);
    assert_eq!((due, out), (10_000, vec![Output::Stop { attempt_id: ATT, grace_ms: core.config().stop_grace_ms }]));
    let (due, out) = tick_through_deadline(&mut core);
    assert_eq!(due, 10_000 + core.config().stop_grace_ms + core.config().kill_slack_ms);
    assert_eq!(out, vec![Output::Stop { attempt_id: ATT, grace_ms: 0 }]);
    // Killed at last; a process of it still holds memory.
    core.on_gpu_readings(due, reading(10 << 30, vec![ours(99, 10 << 30)]), &mut Vec::new());
    let status = ExitStatus { code: None, signal: Some(9), oom_killed: false };
    let exited = RuntimeEvent::Exited { attempt_id: ATT, status, outputs: Vec::new() };
    core.on_runtime(due + 1, exited, &mut Vec::new());
    let (bound, out) = tick_through_deadline(&mut core);
    assert_eq!(bound, due + 1 + core.config().vram_release_bound_ms);
    assert_eq!(out, vec![Output::KillStrays { attempt_id: ATT, pids: vec![99] }]);
    let (recheck, out) = tick_through_deadline(&mut core);
    assert_eq!(recheck, bound + core.config().stray_kill_recheck_ms);
    assert!(matches!(faults(&out).as_slice(), [GpuFault::VramNotReleased { .. }]), "{out:?}");
    assert_eq!(core.next_deadline_ms(), None, "a quarantine waits for a reading or the operator, not for time");
}

#[test]
fn an_undelivered_outputs_bound_wakes_the_core() {
    let mut core = core();
    core.disconnected();
    uploading(&mut core);
    // Its GPU's memory drained at once.
    core.on_gpu_readings(101, reading(0, Vec::new()), &mut Vec::new());
    let (due, out) = tick_through_deadline(&mut core);
    assert_eq!(due, 100 + core.config().upload_timeout_ms);
    assert!(out.contains(&Output::AbortUpload { attempt_id: ATT }), "{out:?}");
}

#[test]
fn an_acknowledged_end_is_forgotten_and_a_reconcile_reaps() {
    let mut core = core();
    let mut out = Vec::new();
    core.on_message(1, ControllerMsg::AckFinished { attempt_ids: vec![ATT] }, &mut out);
    assert!(out.contains(&Output::Forget { attempt_id: ATT }), "{out:?}");
    out.clear();
    core.on_message(2, ControllerMsg::Reconcile { epoch: Epoch(1), keep: Vec::new() }, &mut out);
    assert!(out.contains(&Output::Reap), "{out:?}");
}

/// The heartbeats a tick at each of `at_ms` sends, each after an ack that keeps the link alive.
fn heartbeats(core: &mut AgentCore, at_ms: &[u64]) -> Vec<Heartbeat> {
    let mut beats = Vec::new();
    for &now_ms in at_ms {
        let mut out = Vec::new();
        core.on_message(now_ms, ControllerMsg::HeartbeatAck { seq: 0 }, &mut out);
        core.tick(now_ms, &mut out);
        beats.extend(out.into_iter().filter_map(|o| match o {
            Output::Send(AgentMsg::Heartbeat(hb)) => Some(hb),
            _ => None,
        }));
    }
    beats
}

#[test]
fn heartbeats_are_numbered_in_order_and_carry_the_runtimes_health() {
    let mut core = core();
    let every = core.config().heartbeat_interval_ms;
    core.set_unhealthy(Some("the Docker daemon does not answer".into()));
    let beats = heartbeats(&mut core, &[every, 2 * every]);
    assert_eq!(beats.iter().map(|b| b.seq).collect::<Vec<_>>(), [1, 2]);
    assert!(beats.iter().all(|b| b.unhealthy.as_deref() == Some("the Docker daemon does not answer")), "{beats:?}");
    core.set_unhealthy(None);
    let beats = heartbeats(&mut core, &[3 * every]);
    assert_eq!((beats[0].seq, beats[0].unhealthy.clone()), (3, None));
}

#[test]
fn the_link_is_down_once_acks_stop_and_up_again_on_reconnect() {
    let mut core = core();
    assert!(core.is_connected());
    let mut out = Vec::new();
    core.tick(core.config().ack_timeout_ms, &mut out);
    assert!(out.contains(&Output::Reconnect), "{out:?}");
    assert!(!core.is_connected());
    core.connected(core.config().ack_timeout_ms + 1, &mut Vec::new());
    assert!(core.is_connected());
    core.disconnected();
    assert!(!core.is_connected());
}

#[test]
fn a_cancelled_attempt_is_stopping_until_it_exits() {
    let mut core = core();
    assign(&mut core, 0, spec(0));
    core.on_runtime(1, RuntimeEvent::Started { attempt_id: ATT, handle: "h".into() }, &mut Vec::new());
    assert!(!core.is_stopping(ATT));
    core.on_message(2, ControllerMsg::Cancel { attempt_id: ATT, grace_ms: 1_000 }, &mut Vec::new());
    assert!(core.is_stopping(ATT));
    assert_eq!(phase(&core), Some(AttemptPhase::Stopping));
    let status = ExitStatus { code: None, signal: Some(15), oom_killed: false };
    core.on_runtime(3, RuntimeEvent::Exited { attempt_id: ATT, status, outputs: Vec::new() }, &mut Vec::new());
    assert!(!core.is_stopping(ATT));
}

#[test]
fn an_attempt_reports_its_progress_while_running_and_all_steps_done_while_uploading() {
    let mut core = core();
    assign(&mut core, 0, spec(0));
    core.on_runtime(1, RuntimeEvent::Started { attempt_id: ATT, handle: "h".into() }, &mut Vec::new());
    core.on_runtime(2, RuntimeEvent::Progress { attempt_id: ATT, step: 3, total: 10 }, &mut Vec::new());
    assert_eq!(phase(&core), Some(AttemptPhase::Running { step: 3, total: 10 }));
    clean_exit(&mut core, 100, vec![artifact()]);
    assert_eq!(phase(&core), Some(AttemptPhase::Running { step: 10, total: 10 }), "its outputs are on their way");
    // Docker's log reader runs apart from its exit watch: a progress line read after the exit
    // does not move the finished run back.
    core.on_runtime(101, RuntimeEvent::Progress { attempt_id: ATT, step: 5, total: 10 }, &mut Vec::new());
    assert_eq!(phase(&core), Some(AttemptPhase::Running { step: 10, total: 10 }));
}

#[test]
fn a_resent_order_for_a_finished_attempt_does_not_run_it_again() {
    let mut core = core();
    let mut s = spec(0);
    s.outputs.clear();
    assign(&mut core, 0, s.clone());
    assert!(finished(&clean_exit(&mut core, 5, Vec::new())).is_some());
    let again = assign(&mut core, 6, s);
    assert!(!again.iter().any(|o| matches!(o, Output::Start { .. })), "{again:?}");
}

fn assign_at(core: &mut AgentCore, epoch: u64, attempt: u64, gpu: &str) -> Vec<Output> {
    let mut s = spec(0);
    s.outputs.clear();
    let msg = ControllerMsg::Assign(Box::new(Assign {
        epoch: Epoch(epoch),
        attempt_id: AttemptId(attempt),
        job_id: JobId(attempt),
        spec: s,
        gpu_uuids: vec![gpu.into()],
        trace: TraceContext::default(),
    }));
    let mut out = Vec::new();
    core.on_message(0, msg, &mut out);
    out
}

#[test]
fn orders_of_the_current_epoch_run_and_those_of_an_older_one_are_refused() {
    let gpus = (0..3)
        .map(|i| GpuInfo { index: i, uuid: format!("GPU-{i}"), name: "fake".into(), total_vram_bytes: 80 << 30 })
        .collect();
    let mut core = AgentCore::new(0, AgentConfig::default(), gpus, true, "sim", 1, Vec::new());
    core.connected(0, &mut Vec::new());
    assert!(matches!(assign_at(&mut core, 2, 1, "GPU-0").as_slice(), [Output::Start { .. }]));
    assert_eq!(core.known_epoch(), Epoch(2));
    assert!(matches!(assign_at(&mut core, 2, 2, "GPU-1").as_slice(), [Output::Start { .. }]), "the same epoch");
    let out = assign_at(&mut core, 1, 3, "GPU-2");
    let Some(AttemptOutcome::Rejected { reason }) = out.iter().find_map(|o| match o {
        Output::Send(AgentMsg::AttemptFinished { outcome, .. }) => Some(outcome.clone()),
        _ => None,
    }) else {
        panic!("an order of epoch 1 after epoch 2 is stale: {out:?}")
    };
    assert!(reason.contains("stale order from controller epoch 1, current is 2"), "{reason}");
    assert_eq!(core.known_epoch(), Epoch(2));
}

#[test]
fn a_quarantined_gpu_is_listed_and_a_small_leak_is_told_in_mib() {
    let mut core = core();
    core.on_gpu_readings(0, reading(0, Vec::new()), &mut Vec::new());
    uploading(&mut core);
    let bound = core.config().vram_release_bound_ms;
    core.on_gpu_readings(100 + bound, reading(512 << 20, Vec::new()), &mut Vec::new());
    assert_eq!(core.faulty_gpus().collect::<Vec<_>>(), [GPU]);
    let q = heartbeat_gpu(&mut core, 100 + bound + 1_000).quarantine.expect("quarantined");
    assert!(q.reason.starts_with("512 MiB held above its baseline"), "{}", q.reason);
}

#[test]
fn sysexits_usage_codes_and_the_shells_cannot_execute_and_not_found_are_terminal() {
    use cosmos_proto::Retry::{Retryable, Terminal};
    for (codes, want) in [([64, 70, 78, 126, 127], Terminal), ([1, 63, 79, 125, 128], Retryable)] {
        for code in codes {
            let mut c = core();
            assign(&mut c, 0, spec(0));
            let outcome = exit_with(&mut c, code, b"");
            assert!(
                matches!(outcome, Some(AttemptOutcome::Failed { retry, .. }) if retry == want),
                "exit {code}: {outcome:?}"
            );
        }
    }
}

#[test]
fn the_quote_holds_lines_up_to_its_byte_bound_exactly_and_cuts_at_a_character() {
    // Lines that fill the bound to the byte are all quoted; one byte more leaves the oldest out.
    let (a, b) = ("z".repeat(700), "z".repeat(QUOTED_BYTES_MAX - 1400));
    assert_eq!(error_tail(&format!("{b}\n{a}\n{a}\n"), |_| false).len(), 3);
    assert_eq!(error_tail(&format!("{b}z\n{a}\n{a}\n"), |_| false).len(), 2);
    // A line cut inside a two-byte character ends before it.
    let long = format!("{}é{}", "a".repeat(QUOTED_LINE_BYTES_MAX - 1), "b".repeat(10));
    assert_eq!(cosmos_agent_core::exit::quoted(&long), "a".repeat(QUOTED_LINE_BYTES_MAX - 1));
}
