//! A controller whose store cannot be written stops loudly (issue 11, point 1):
//! its data directory on a small tmpfs, filled up, then a submission.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmpfs mounted for one test, unmounted when dropped. Needs root, as CI runs.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).output();
        match out {
            Ok(o) if o.status.success() => Tmpfs(at.to_path_buf()),
            other => panic!("this test mounts a tmpfs and needs root (CI runs as root): {other:?}"),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_controller_whose_disk_fills_up_answers_503_and_exits_naming_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = Tmpfs::mount(&dir.path().join("mnt"), "4m");
    let data = mnt.0.join("ctl");
    let (mut ctl, api, _) = super::spawn_controller(&[], &data, &dir.path().join("ctl.log"));
    let bearer = format!("Bearer {}", std::fs::read_to_string(data.join("api.token")).unwrap().trim());

    // Fill the file system to the last byte.
    let mut fill = std::fs::File::create(mnt.0.join("fill")).unwrap();
    while fill.write_all(&[0u8; 64 * 1024]).is_ok() {}
    while fill.write_all(&[0u8; 512]).is_ok() {}
    let _ = fill.sync_all();

    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(8)))
        .build()
        .new_agent();
    let env: serde_json::Map<String, serde_json::Value> =
        (0..8).map(|i| (format!("BIG{i}"), serde_json::Value::from("x".repeat(60_000)))).collect();
    let body = serde_json::json!({ "jobs": [{ "command": ["true"], "env": env }] }).to_string();
    let asked = Instant::now();
    let resp = agent
        .post(format!("{api}/v1/jobs"))
        .header("Authorization", &bearer)
        .header("Content-Type", "application/json")
        .send(body.as_bytes());
    match resp {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let text = r.body_mut().read_to_string().unwrap_or_default();
            assert_eq!(status, 503, "a submission the store could not take: {text}");
        }
        // The process may already be gone when the answer would have been sent; it must not hang.
        Err(ureq::Error::Timeout(_)) => panic!("the submission hung instead of being answered 503"),
        Err(_) => {}
    }
    let deadline = asked + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = ctl.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the controller went on for 10 s with a store it cannot write");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "a failed store is a non-zero exit: {status}");
    let log = std::fs::read_to_string(dir.path().join("ctl.log")).unwrap();
    let store = data.join("store.sqlite");
    assert!(log.contains(&format!("the store {} cannot be written", store.display())), "{log}");
    assert!(log.contains("full"), "the cause is named: {log}");
}
