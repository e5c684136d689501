//! Job spec validation: every rule names its field, every limit admits its maximum and refuses one more.

use cosmos_proto::spec::*;
use cosmos_proto::*;

#[test]
fn a_plain_command_spec_is_valid() {
    assert_eq!(JobSpec::command("j", ["true"]).validate(), Ok(()));
}

#[test]
fn each_rule_names_its_field() {
    let base = JobSpec::command("j", ["true"]);
    let cases: Vec<(&str, Box<dyn Fn(&mut JobSpec)>)> = vec![
        ("command", Box::new(|s| s.command.clear())),
        (
            "env",
            Box::new(|s| {
                s.env.insert("1BAD".into(), "x".into());
            }),
        ),
        (
            "env",
            Box::new(|s| {
                s.env.insert("CUDA_VISIBLE_DEVICES".into(), "0".into());
            }),
        ),
        (
            "mounts",
            Box::new(|s| s.mounts.push(Mount { volume: "../etc".into(), target: "/x".into(), read_only: true })),
        ),
        (
            "mounts",
            Box::new(|s| s.mounts.push(Mount { volume: "ckpt".into(), target: "/a/../b".into(), read_only: true })),
        ),
        (
            "inputs",
            Box::new(|s| {
                s.inputs.push(InputArtifact { sha256: Sha256([0; 32]), size_bytes: 1, path: "../../etc/passwd".into() })
            }),
        ),
        ("outputs", Box::new(|s| s.outputs.push(OutputArtifact { path: "/abs".into(), required: true }))),
        ("terminal_exit_codes", Box::new(|s| s.terminal_exit_codes.push(0))),
        ("gpus", Box::new(|s| s.gpus = GPUS_MAX + 1)),
        ("timeout", Box::new(|s| s.timeout_ms = 0)),
        ("max_attempts", Box::new(|s| s.max_attempts = 0)),
        ("image", Box::new(|s| s.image = Some("has space".into()))),
        ("workdir", Box::new(|s| s.workdir = Some("/workspace".into()))),
        (
            "workdir",
            Box::new(|s| {
                s.image = Some("img".into());
                s.workdir = Some("relative".into());
            }),
        ),
    ];
    for (field, breaks) in cases {
        let mut spec = base.clone();
        breaks(&mut spec);
        let err = spec.validate().expect_err(field);
        assert_eq!(err.field, field, "{err}");
    }
}

/// A spec with `n` of something: each limit is inclusive, and one more is refused naming the field.
type Grow = fn(&mut JobSpec, usize);

fn path_of(n: usize) -> String {
    "p".repeat(n)
}

#[test]
fn every_limit_admits_its_maximum_and_refuses_one_more() {
    let base = JobSpec::command("j", ["true"]);
    let limits: Vec<(&str, usize, Grow)> = vec![
        ("name", NAME_BYTES_MAX, |s, n| s.name = "n".repeat(n)),
        ("image", NAME_BYTES_MAX, |s, n| s.image = Some("i".repeat(n))),
        ("command", COMMAND_ARGS_MAX, |s, n| s.command = vec!["a".to_string(); n]),
        ("command", COMMAND_BYTES_MAX, |s, n| s.command = vec!["c".repeat(n - 1), "x".to_string()]),
        ("env", ENV_VARS_MAX, |s, n| s.env = (0..n).map(|i| (format!("V{i}"), String::new())).collect()),
        ("env", ENV_VALUE_BYTES_MAX, |s, n| {
            s.env.insert("V".to_string(), "v".repeat(n));
        }),
        ("mounts", LIST_ITEMS_MAX, |s, n| {
            s.mounts = vec![Mount { volume: "ckpt".into(), target: "/c".into(), read_only: true }; n]
        }),
        ("mounts", PATH_BYTES_MAX, |s, n| {
            s.mounts = vec![Mount { volume: "ckpt".into(), target: format!("/{}", path_of(n - 1)), read_only: true }]
        }),
        ("workdir", PATH_BYTES_MAX, |s, n| {
            s.image = Some("img".into());
            s.workdir = Some(format!("/{}", path_of(n - 1)));
        }),
        ("inputs", LIST_ITEMS_MAX, |s, n| {
            s.inputs = (0..n)
                .map(|i| InputArtifact { sha256: Sha256([0; 32]), size_bytes: 1, path: format!("in/{i}") })
                .collect()
        }),
        ("inputs", PATH_BYTES_MAX, |s, n| {
            s.inputs = vec![InputArtifact { sha256: Sha256([0; 32]), size_bytes: 1, path: path_of(n) }]
        }),
        ("outputs", LIST_ITEMS_MAX, |s, n| {
            s.outputs = (0..n).map(|i| OutputArtifact { path: format!("out/{i}"), required: false }).collect()
        }),
        ("outputs", PATH_BYTES_MAX, |s, n| s.outputs = vec![OutputArtifact { path: path_of(n), required: true }]),
        ("terminal_exit_codes", LIST_ITEMS_MAX, |s, n| s.terminal_exit_codes = vec![3; n]),
        ("terminal_exit_codes", 255, |s, n| s.terminal_exit_codes = vec![n as i32]),
        ("gpus", GPUS_MAX as usize, |s, n| s.gpus = n as u32),
        ("timeout", TIMEOUT_MS_MAX as usize, |s, n| s.timeout_ms = n as u64),
        ("max_attempts", ATTEMPTS_MAX as usize, |s, n| s.max_attempts = n as u32),
        ("labels", LIST_ITEMS_MAX, |s, n| s.labels = (0..n).map(|i| (format!("k{i}"), String::new())).collect()),
        ("labels", NAME_BYTES_MAX, |s, n| {
            s.labels.insert("k".repeat(n), String::new());
        }),
        ("labels", PATH_BYTES_MAX, |s, n| {
            s.labels.insert("k".to_string(), "v".repeat(n));
        }),
    ];
    for (field, max, grow) in limits {
        let mut spec = base.clone();
        grow(&mut spec, max);
        assert_eq!(spec.validate(), Ok(()), "{field} at its maximum {max}");
        let mut spec = base.clone();
        grow(&mut spec, max + 1);
        let err = spec.validate().expect_err(field);
        assert_eq!(err.field, field, "{field} at {}: {err}", max + 1);
    }
}

#[test]
fn characters_that_could_fake_output_or_cut_a_string_are_refused() {
    let base = JobSpec::command("j", ["true"]);
    let cases: Vec<(&str, fn(&mut JobSpec))> = vec![
        ("name", |s| s.name = "ok\n| 9 | forged row".into()),
        ("name", |s| s.name = "bell\u{7}".into()),
        ("command", |s| s.command = vec!["echo".into(), "a\0b".into()]),
        ("command", |s| s.command = vec![String::new(), "x".into()]),
        ("env", |s| {
            s.env.insert("V".into(), "a\0b".into());
        }),
        ("env", |s| {
            s.env.insert(String::new(), "x".into());
        }),
        ("env", |s| {
            s.env.insert("A-B".into(), "x".into());
        }),
        ("env", |s| {
            s.env.insert("NVIDIA_VISIBLE_DEVICES".into(), "all".into());
        }),
        ("image", |s| s.image = Some(String::new())),
        ("mounts", |s| s.mounts.push(Mount { volume: String::new(), target: "/c".into(), read_only: true })),
        ("mounts", |s| s.mounts.push(Mount { volume: "ckpt".into(), target: "rel".into(), read_only: true })),
        ("workdir", |s| {
            s.image = Some("img".into());
            s.workdir = Some("/a/../../etc".into());
        }),
        ("outputs", |s| s.outputs.push(OutputArtifact { path: "a/./b".into(), required: true })),
        ("outputs", |s| s.outputs.push(OutputArtifact { path: "a//b".into(), required: true })),
        ("outputs", |s| s.outputs.push(OutputArtifact { path: String::new(), required: true })),
        ("outputs", |s| s.outputs.push(OutputArtifact { path: "a\0b".into(), required: true })),
        ("terminal_exit_codes", |s| s.terminal_exit_codes.push(-1)),
        ("timeout", |s| s.timeout_ms = TIMEOUT_MS_MAX + 1),
    ];
    for (field, breaks) in cases {
        let mut spec = base.clone();
        breaks(&mut spec);
        let err = spec.validate().expect_err(field);
        assert_eq!(err.field, field, "{err}");
        assert!(!err.problem.is_empty() && err.to_string().contains(field), "{err}");
    }
    // The smallest values the limits allow are allowed.
    let mut spec = base.clone();
    spec.terminal_exit_codes = vec![1];
    spec.timeout_ms = 1;
    spec.max_attempts = 1;
    spec.gpus = 0;
    assert_eq!(spec.validate(), Ok(()));
}

/// The limits and defaults the README's job-line section publishes, by value: a job line
/// valid under one version stays valid under the next.
#[test]
fn the_published_limits_and_defaults_hold() {
    const DAY_MS: u64 = 24 * 3600 * 1000;
    let plain = JobSpec::command("j", ["true"]);
    assert_eq!((plain.timeout_ms, plain.max_attempts, plain.gpus), (DAY_MS, 3, 1), "what a line that names none gets");
    let with = |f: &dyn Fn(&mut JobSpec)| {
        let mut s = JobSpec::command("j", ["true"]);
        f(&mut s);
        s.validate()
    };
    let value = |n: usize| move |s: &mut JobSpec| drop(s.env.insert("V".into(), "v".repeat(n)));
    let argv = |n: usize| move |s: &mut JobSpec| s.command = vec!["c".repeat(n - 1), "x".into()];
    let vars = |n: usize| move |s: &mut JobSpec| s.env = (0..n).map(|i| (format!("V{i}"), String::new())).collect();
    let output =
        |n: usize| move |s: &mut JobSpec| s.outputs = vec![OutputArtifact { path: path_of(n), required: true }];
    let cases: [(&str, &dyn Fn(&mut JobSpec), &dyn Fn(&mut JobSpec)); 9] = [
        ("timeout: a week", &|s| s.timeout_ms = 7 * DAY_MS, &|s| s.timeout_ms = 7 * DAY_MS + 1),
        ("an env value: 64 KiB", &value(64 << 10), &value((64 << 10) + 1)),
        ("argv: 256 KiB", &argv(256 << 10), &argv((256 << 10) + 1)),
        ("argv: 4,096 words", &|s| s.command = vec!["a".into(); 4096], &|s| s.command = vec!["a".into(); 4097]),
        ("gpus: 64", &|s| s.gpus = 64, &|s| s.gpus = 65),
        ("attempts: 100", &|s| s.max_attempts = 100, &|s| s.max_attempts = 101),
        ("a name: 256 bytes", &|s| s.name = "n".repeat(256), &|s| s.name = "n".repeat(257)),
        ("env: 1,024 variables", &vars(1024), &vars(1025)),
        ("a path: 1,024 bytes", &output(1024), &output(1025)),
    ];
    for (limit, at, past) in cases {
        assert_eq!(with(at), Ok(()), "{limit}");
        assert!(with(past).is_err(), "{limit}: one past it is refused");
    }
}

#[test]
fn a_volume_name_may_hold_letters_digits_dashes_and_underscores_alone() {
    let with_volume = |volume: &str| {
        let mut s = JobSpec::command("j", ["true"]);
        s.mounts = vec![Mount { volume: volume.into(), target: "/ckpt".into(), read_only: true }];
        s.validate()
    };
    assert_eq!(with_volume("cosmos-ckpt_v2"), Ok(()));
    for bad in ["", "ckpt/x", "ckpt.v2", "ckpt v2"] {
        assert!(with_volume(bad).is_err(), "{bad:?}");
    }
}
