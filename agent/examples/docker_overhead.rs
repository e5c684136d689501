//! What the Docker runtime adds over a bare `docker run`, and how many
//! containers one runtime starts per second. Issue 6's figures.
//!
//! ```text
//! scripts/build-images
//! cargo run --release -p cosmos-agent --example docker_overhead [-- RUNS BURST]
//! ```
//!
//! Overhead: RUNS (default 20) runs of `/testjob` (prints two lines, exits 0)
//! in `cosmos-testjob:dev`, alternating a bare `docker run --rm` (wall time of
//! the CLI) with the runtime (from `Runtime::start` to `Exited`, which comes
//! after the logs were drained, the exit inspected, the outputs hashed and the
//! container removed); medians side by side.
//!
//! Throughput: BURST (default 50) such containers handed to one runtime at
//! once; containers per second from the first `start` to the last `Exited`
//! (and to the last `Started`).

use cosmos_agent::core::RuntimeEvent;
use cosmos_agent::docker::{DockerConfig, DockerRuntime};
use cosmos_agent::runtime::{Runtime, StartRequest, attempt_dir};
use cosmos_proto::{AttemptId, Epoch, JobId, JobSpec};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const IMAGE: &str = "cosmos-testjob:dev";

fn request(root: &Path, id: u64) -> StartRequest {
    let mut spec = JobSpec::command("overhead", ["/testjob"]);
    spec.image = Some(IMAGE.into());
    let attempt_id = AttemptId(id);
    StartRequest {
        attempt_id,
        job_id: JobId(id),
        epoch: Epoch(1),
        spec,
        gpu_uuids: vec!["GPU-sim-0".into()],
        gpu_indices: vec![0],
        work_dir: attempt_dir(root, attempt_id),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let burst: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let dir = tempfile::tempdir().unwrap();
    let mut config = DockerConfig::new(format!("overhead-{}", std::process::id()), dir.path());
    config.gpus_simulated = true;
    let (tx, mut rx) = mpsc::channel(4096);
    let mut rt = DockerRuntime::new(config, tx);
    rt.ping().await.expect("Docker answers (then run scripts/build-images)");

    let mut next_id = 1u64;
    let mut run_one = async |rt: &mut DockerRuntime, rx: &mut mpsc::Receiver<RuntimeEvent>| -> Duration {
        let id = next_id;
        next_id += 1;
        let t0 = Instant::now();
        rt.start(request(dir.path(), id));
        loop {
            match rx.recv().await.expect("events") {
                RuntimeEvent::Exited { attempt_id, status, .. } if attempt_id == AttemptId(id) => {
                    assert_eq!(status.code, Some(0), "{status:?}");
                    return t0.elapsed();
                }
                RuntimeEvent::StartFailed { reason, .. } => panic!("{reason}"),
                _ => {}
            }
        }
    };
    // Warm-up: the image's layers in the page cache, the API version agreed.
    run_one(&mut rt, &mut rx).await;
    let bare = || {
        let t0 = Instant::now();
        let out = std::process::Command::new("docker").args(["run", "--rm", IMAGE, "/testjob"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        t0.elapsed()
    };
    bare();

    let (mut bare_times, mut agent_times) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        bare_times.push(bare());
        agent_times.push(run_one(&mut rt, &mut rx).await);
    }
    let (b, a) = (median(bare_times.clone()), median(agent_times.clone()));
    println!("one container at a time, {runs} runs each, alternating (median, min, max):");
    println!(
        "  docker run --rm {IMAGE} /testjob   {:7.1} ms  ({:.1} .. {:.1})",
        ms(b),
        ms(*bare_times.iter().min().unwrap()),
        ms(*bare_times.iter().max().unwrap())
    );
    println!(
        "  DockerRuntime start -> Exited      {:7.1} ms  ({:.1} .. {:.1})",
        ms(a),
        ms(*agent_times.iter().min().unwrap()),
        ms(*agent_times.iter().max().unwrap())
    );
    println!("  overhead of the runtime            {:+7.1} ms ({:+.0}%)", ms(a) - ms(b), (ms(a) / ms(b) - 1.0) * 100.0);

    let first = next_id;
    let t0 = Instant::now();
    for id in first..first + burst {
        rt.start(request(dir.path(), id));
    }
    let (mut started, mut exited) = (0u64, 0u64);
    let mut all_started = Duration::ZERO;
    while exited < burst {
        match rx.recv().await.expect("events") {
            RuntimeEvent::Started { .. } => {
                started += 1;
                if started == burst {
                    all_started = t0.elapsed();
                }
            }
            RuntimeEvent::Exited { status, .. } => {
                assert_eq!(status.code, Some(0), "{status:?}");
                exited += 1;
            }
            RuntimeEvent::StartFailed { reason, .. } => panic!("{reason}"),
            _ => {}
        }
    }
    let all_exited = t0.elapsed();
    println!("{burst} containers handed to one runtime at once:");
    println!(
        "  all started after {:.2} s ({:.1} containers/s); all exited and removed after {:.2} s ({:.1} containers/s)",
        all_started.as_secs_f64(),
        burst as f64 / all_started.as_secs_f64(),
        all_exited.as_secs_f64(),
        burst as f64 / all_exited.as_secs_f64()
    );
    assert!(rt.live_attempts().is_empty());
}
