//! Config files for the daemons (`cosmos controller --config FILE`, `cosmos
//! agent --config FILE`): TOML whose keys are the command's own flags, so
//! every flag — those added later included — is a key with no code here.
//!
//! A key is the flag's long name without its `--` and with `_` for `-`
//! (`--data-dir` is `data_dir`); a switch takes `true`/`false`, a repeatable
//! flag an array (or, for `NAME=VALUE` flags, a table). Precedence, highest
//! first: the command line, the flag's `COSMOS_*` variable, the file, the
//! default. The file is turned into the flags it stands for and parsed by clap
//! with the rest, so a value in the file is checked exactly as on the command
//! line. Unknown keys, and values of the wrong shape, are errors naming the
//! key and the file.

use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The subcommands that take `--config`.
pub const ROLES: [&str; 2] = ["controller", "agent"];
/// The flag naming the file; not itself a key.
const CONFIG_ID: &str = "config";
/// Key names that look like secrets: refused with the fix rather than "unknown".
const SECRET_WORDS: [&str; 4] = ["token", "passphrase", "password", "secret"];

/// Why the command line and its config file do not make a command.
#[derive(Debug)]
pub enum ConfigError {
    /// clap refused the command line (or printed help); it formats and exits itself.
    Clap(clap::Error),
    /// The file is unreadable, not TOML, or has a key or value that is wrong.
    File(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Clap(e) => write!(f, "{}", e.render()),
            ConfigError::File(s) => f.write_str(s),
        }
    }
}

/// One flag a file sets, as clap will read it.
#[derive(Debug)]
struct FileArg {
    key: String,
    long: String,
}

/// Parses `argv` into the CLI, with the `--config` file of `cosmos controller`
/// or `cosmos agent` filling in the flags neither the command line nor their
/// variables set.
pub fn parse(argv: Vec<OsString>) -> Result<crate::Cli, ConfigError> {
    // A first, lenient pass finds the subcommand, its --config and which flags
    // the command line and the environment already set; anything wrong there
    // is reported by the strict pass below.
    let lenient = crate::Cli::command().ignore_errors(true).try_get_matches_from(&argv);
    let mut argv = argv;
    let mut from_file = Vec::new();
    let mut file_path = None;
    if let Ok(matches) = &lenient
        && let Some((role, sub)) = matches.subcommand()
        && let Some(path) = ROLES.contains(&role).then(|| config_path(sub)).flatten()
    {
        let cmd = role_command(role);
        let (args, extra) = flags_of_file(&path, &cmd, |id| {
            matches!(sub.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
                || matches!(matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
        })?;
        argv.extend(extra);
        from_file = args;
        file_path = Some(path);
    }
    let matches = crate::Cli::command().try_get_matches_from(&argv).map_err(|e| match &file_path {
        Some(path) => with_file_note(e, path, &from_file),
        None => ConfigError::Clap(e),
    })?;
    crate::Cli::from_arg_matches(&matches).map_err(ConfigError::Clap)
}

fn config_path(sub: &clap::ArgMatches) -> Option<PathBuf> {
    sub.try_get_one::<PathBuf>(CONFIG_ID).ok().flatten().cloned()
}

/// The role's subcommand, built (global flags propagated into it).
fn role_command(role: &str) -> clap::Command {
    let mut root = crate::Cli::command();
    root.build();
    root.find_subcommand(role).expect("the role is a subcommand").clone()
}

/// The flags a file stands for, leaving out those `is_set` says are already set.
fn flags_of_file(
    path: &Path,
    cmd: &clap::Command,
    is_set: impl Fn(&str) -> bool,
) -> Result<(Vec<FileArg>, Vec<OsString>), ConfigError> {
    let table = read_table(path)?;
    let role = cmd.get_name();
    let file = path.display();
    let mut args = Vec::new();
    let mut argv = Vec::new();
    for (key, value) in &table {
        let Some(arg) = arg_of_key(cmd, key) else {
            return Err(ConfigError::File(unknown_key(path, cmd, key)));
        };
        let long = arg.get_long().expect("keys are long flags").to_string();
        let id = arg.get_id().as_str();
        let values = values_of(value, arg.get_action())
            .map_err(|shape| ConfigError::File(format!("{file}: `{key}` (--{long} of cosmos {role}) {shape}")))?;
        if is_set(id) {
            tracing::debug!(key, "set on the command line or by its variable; the config file's value is not used");
            continue;
        }
        match values {
            Values::Switch(true) => argv.push(OsString::from(format!("--{long}"))),
            Values::Switch(false) => {}
            Values::List(list) => argv.extend(list.into_iter().map(|v| OsString::from(format!("--{long}={v}")))),
        }
        args.push(FileArg { key: key.clone(), long });
    }
    Ok((args, argv))
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let file = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::File(format!("cannot read the config file {file}: {e}; give --config the path of a TOML file"))
    })?;
    text.parse::<toml::Table>().map_err(|e| ConfigError::File(format!("{file} is not valid TOML: {e}")))
}

/// The flag a key names: its long name with `_` for `-`; never `config`,
/// `help`, `version` or a hidden flag.
fn arg_of_key<'a>(cmd: &'a clap::Command, key: &str) -> Option<&'a clap::Arg> {
    cmd.get_arguments().find(|a| {
        !a.is_positional()
            && !a.is_hide_set()
            && a.get_id() != CONFIG_ID
            && !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
            && a.get_long().is_some_and(|l| l.replace('-', "_") == key)
    })
}

/// The keys a role's file takes, in the order `--help` lists them.
pub fn keys(role: &str) -> Vec<String> {
    let cmd = role_command(role);
    let mut keys: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long().map(|l| l.replace('-', "_")))
        .filter(|k| arg_of_key(&cmd, k).is_some())
        .collect();
    keys.dedup();
    keys
}

fn unknown_key(path: &Path, cmd: &clap::Command, key: &str) -> String {
    let (file, role) = (path.display(), cmd.get_name());
    let underscored = key.replace('-', "_");
    if underscored != key && arg_of_key(cmd, &underscored).is_some() {
        return format!("{file}: unknown key `{key}`; keys spell the flag with `_` for `-`: `{underscored}`");
    }
    if key == CONFIG_ID {
        return format!("{file}: `config` is not a key: a config file cannot name another");
    }
    if SECRET_WORDS.iter().any(|w| key.contains(w)) {
        let fix = match role {
            "agent" => "put the token in a file readable by the agent's user only (chmod 600) and give `token_file`",
            _ => "the controller keeps its tokens in files of its data directory (api.token, agent.token, mode 0600)",
        };
        return format!(
            "{file}: unknown key `{key}`: secrets are never taken inline in a config file, which others may read; {fix}"
        );
    }
    format!(
        "{file}: unknown key `{key}`: cosmos {role} has no --{} flag; its keys are {}",
        key.replace('_', "-"),
        keys(role).join(", ")
    )
}

enum Values {
    Switch(bool),
    List(Vec<String>),
}

/// A TOML value as the flag's values, or what is wrong with its shape.
fn values_of(value: &toml::Value, action: &ArgAction) -> Result<Values, String> {
    let repeatable = matches!(action, ArgAction::Append);
    match (value, action) {
        (toml::Value::Boolean(b), ArgAction::SetTrue) => Ok(Values::Switch(*b)),
        (toml::Value::Boolean(b), ArgAction::SetFalse) => Ok(Values::Switch(!*b)),
        (_, ArgAction::SetTrue | ArgAction::SetFalse) => Err(format!("is a switch: give true or false, not {value}")),
        (toml::Value::Array(items), _) if repeatable => {
            items.iter().map(scalar).collect::<Result<Vec<_>, _>>().map(Values::List)
        }
        (toml::Value::Table(t), _) if repeatable => t
            .iter()
            .map(|(k, v)| scalar(v).map(|v| format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()
            .map(Values::List),
        (toml::Value::Array(_), _) => Err("takes one value, not an array".into()),
        (toml::Value::Table(_), _) => Err("takes one value, not a table (keys are flat: no [sections])".into()),
        (v, _) => scalar(v).map(|s| Values::List(vec![s])),
    }
}

fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => Err(format!("has a nested value {value}; give plain values")),
    }
}

/// clap's error, followed by which of the flags it names came from the file.
fn with_file_note(e: clap::Error, path: &Path, from_file: &[FileArg]) -> ConfigError {
    use clap::error::{ContextKind, ContextValue};
    if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) {
        return ConfigError::Clap(e);
    }
    let mut named = Vec::new();
    for (kind, value) in e.context() {
        if !matches!(kind, ContextKind::InvalidArg | ContextKind::PriorArg) {
            continue;
        }
        let texts = match value {
            ContextValue::String(s) => vec![s.clone()],
            ContextValue::Strings(v) => v.clone(),
            _ => Vec::new(),
        };
        for t in texts {
            let long = t.trim_start_matches("--").split([' ', '=', '<']).next().unwrap_or("").to_string();
            if let Some(a) = from_file.iter().find(|a| a.long == long) {
                named.push(format!("`{}`", a.key));
            }
        }
    }
    let mut text = e.render().to_string();
    if !named.is_empty() {
        named.dedup();
        text.push_str(&format!("\nnote: {} comes from the config file {}\n", named.join(" and "), path.display()));
    } else if e.kind() == clap::error::ErrorKind::MissingRequiredArgument {
        text.push_str(&format!(
            "\nnote: give it as a flag or as a key of the config file {} (the flag's name with `_` for `-`)\n",
            path.display()
        ));
    }
    ConfigError::File(text.trim_end().to_string())
}

/// `cosmos config check FILE`: parses the file as the daemon would start with
/// it (flags none, the environment as it is), then runs the daemon's own
/// start-up checks up to the point where it would open or bind anything.
pub fn check(file: &Path, role: Option<&str>) -> anyhow::Result<bool> {
    let role = match role {
        Some(r) => r.to_string(),
        None => role_of_file(file).ok_or_else(|| {
            anyhow::anyhow!(
                "cannot tell from its name whether {} is a controller's or an agent's config; add --role controller or --role agent",
                file.display()
            )
        })?,
    };
    let argv =
        ["cosmos", role.as_str(), "--config"].into_iter().map(OsString::from).chain([file.as_os_str().to_owned()]);
    let cli = parse(argv.collect()).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::run_checked(cli, true)?;
    println!("{}: a valid config file for cosmos {role}", file.display());
    Ok(true)
}

/// `controller.toml` is a controller's, `agent.toml` (or `gpu-3-agent.toml`) an agent's.
fn role_of_file(file: &Path) -> Option<String> {
    let stem = file.file_stem()?.to_str()?;
    ROLES
        .iter()
        .find(|r| stem == **r || stem.ends_with(&format!("-{r}")) || stem.ends_with(&format!("_{r}")))
        .map(|r| r.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn controller(cli: crate::Cli) -> (PathBuf, std::net::SocketAddr, u64) {
        match cli.command {
            crate::Command::Controller { data_dir, api_listen, lost_after_ms, .. } => {
                (data_dir, api_listen, lost_after_ms)
            }
            other => panic!("not a controller: {other:?}"),
        }
    }

    #[test]
    fn a_file_sets_flags_and_the_command_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "controller.toml",
            "data_dir = \"/srv/cosmos\"\napi_listen = \"127.0.0.1:9000\"\nlost_after_ms = 20000\n",
        );
        let f = f.to_str().unwrap();
        let (data_dir, api, lost) = controller(parse(argv(&["cosmos", "controller", "--config", f])).unwrap());
        assert_eq!((data_dir, api.port(), lost), (PathBuf::from("/srv/cosmos"), 9000, 20000));
        let cli = parse(argv(&["cosmos", "controller", "--config", f, "--lost-after-ms", "5"])).unwrap();
        assert_eq!(controller(cli).2, 5);
    }

    #[test]
    fn switches_lists_and_tables_become_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "agent.toml",
            "controller = \"h:7701\"\ntoken_file = \"/t\"\nwork_dir = \"/w\"\nruntime = \"docker\"\n\
             volume = { checkpoints = \"/data/ckpt\", hf_cache = \"/data/hf\" }\n",
        );
        let cli = parse(argv(&["cosmos", "agent", "--config", f.to_str().unwrap()])).unwrap();
        match cli.command {
            crate::Command::Agent { volumes, runtime, controller, .. } => {
                assert_eq!(runtime, "docker");
                assert_eq!(controller.as_deref(), Some("h:7701"));
                assert_eq!(volumes, ["checkpoints=/data/ckpt", "hf_cache=/data/hf"]);
            }
            other => panic!("not an agent: {other:?}"),
        }
        let f = write(dir.path(), "c.toml", "data_dir = \"/d\"\nrun_env = [\"A=1\", \"B=2\"]\n");
        let cli = parse(argv(&["cosmos", "controller", "--config", f.to_str().unwrap()])).unwrap();
        match cli.command {
            crate::Command::Controller { cosmos, .. } => {
                assert_eq!(cosmos.run_env, [("A".into(), "1".into()), ("B".into(), "2".into())])
            }
            other => panic!("not a controller: {other:?}"),
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = |text: &str| {
            let f = write(dir.path(), "controller.toml", text);
            parse(argv(&["cosmos", "controller", "--config", f.to_str().unwrap()])).unwrap_err().to_string()
        };
        let e = err("data_dir = \"/d\"\nlost_after = 5\n");
        assert!(e.contains("controller.toml: unknown key `lost_after`") && e.contains("lost_after_ms"), "{e}");
        let e = err("data-dir = \"/d\"\n");
        assert!(e.contains("unknown key `data-dir`") && e.contains("`data_dir`"), "{e}");
        let e = err("data_dir = \"/d\"\ntoken = \"abc\"\n");
        assert!(e.contains("secrets are never taken inline"), "{e}");
        let e = err("data_dir = \"/d\"\napi_listen = \"nowhere\"\n");
        assert!(e.contains("--api-listen") && e.contains("`api_listen` comes from the config file"), "{e}");
        let e = err("data_dir = [\"/d\"]\n");
        assert!(e.contains("`data_dir` (--data-dir of cosmos controller) takes one value, not an array"), "{e}");
        let e = err("data_dir = \"/d\"\n[cosmos]\nimage = \"x\"\n");
        assert!(e.contains("unknown key `cosmos`"), "{e}");
        let e = err("data_dir = \"/d\"\nlost_after_ms = \n");
        assert!(e.contains("is not valid TOML"), "{e}");
        let e = err("api_listen = \"127.0.0.1:1\"\n");
        assert!(e.contains("--data-dir") && e.contains("key of the config file"), "{e}");
    }

    #[test]
    fn every_flag_of_the_daemons_is_a_key() {
        let keys = keys("controller");
        for k in ["data_dir", "api_listen", "agent_listen", "cosmos_image", "run_env", "log_format"] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
        assert!(!keys.iter().any(|x| x == "config" || x == "help"), "{keys:?}");
        let keys = self::keys("agent");
        for k in ["controller", "listen", "token_file", "work_dir", "volume", "simulated_gpus"] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn roles_come_from_file_names() {
        assert_eq!(role_of_file(Path::new("/etc/cosmos/controller.toml")).as_deref(), Some("controller"));
        assert_eq!(role_of_file(Path::new("gpu-3-agent.toml")).as_deref(), Some("agent"));
        assert_eq!(role_of_file(Path::new("cosmos.toml")), None);
    }
}
