//! `cosmos agent install ssh://USER@HOST[:PORT]` and `cosmos agent uninstall`:
//! makes a host an agent the controller reaches over SSH, in one idempotent
//! command, through nothing but SSH (exec channels and SFTP).
//!
//! Install: preflight (architecture, C library, systemd, root or `sudo`, free disk);
//! the binary uploaded with SFTP only when the installed one's sha256
//! differs, verified on the host and moved into place with `mv -f` (SFTP's
//! rename cannot replace a file on OpenSSH); the token, the config and the
//! unit of `deploy/cosmos-agent.service` written only when they differ;
//! `systemctl daemon-reload` only when the unit changed, a restart only when
//! something changed; then the controller's own handshake over an SSH channel
//! to the agent's socket; last, the host registered with the controller as
//! `cosmos agents add` does.

use crate::client::{Client, ClientArgs};
use anyhow::{Context, anyhow, bail};
use cosmos_controller::hosts::{HostEntry, HostView};
use cosmos_proto::handshake::{self, HandshakeError, Hello, Refusal, Role, Token};
use cosmos_ssh::russh_sftp;
use cosmos_ssh::{AgentEndpoint, ExecOutput, Session, Target};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the binary goes on the host (the unit's `ExecStart`).
pub const BIN_PATH: &str = "/usr/local/bin/cosmos";
/// The agent token on the host.
pub const TOKEN_PATH: &str = "/etc/cosmos/agent.token";
/// The agent's per-host settings: its further flags, read by the unit's `EnvironmentFile`.
pub const CONFIG_PATH: &str = "/etc/cosmos/agent.env";
/// The agent's config file, which the unit's `ExecStart` names (listen socket, token file, work directory).
pub const AGENT_TOML_PATH: &str = "/etc/cosmos/agent.toml";
/// The config file written where the host has none: the one in `deploy/`, byte for byte. An existing one is the
/// operator's and is left alone; flags given to the installer go to [`CONFIG_PATH`], which overrides it.
pub const AGENT_TOML_TEXT: &str = include_str!("../deploy/agent.toml");
/// The systemd unit's name.
pub const UNIT: &str = "cosmos-agent.service";
/// Where the unit goes.
pub const UNIT_PATH: &str = "/etc/systemd/system/cosmos-agent.service";
/// The unit installed: the one in `deploy/`, byte for byte.
pub const UNIT_TEXT: &str = include_str!("../deploy/cosmos-agent.service");
/// The group given the agent's socket; the SSH user (when not root) is made a member.
pub const GROUP: &str = "cosmos";
/// The system user the unit runs the agent as (`User=`), created with [`GROUP`] as its group, as the .deb does.
pub const USER: &str = "cosmos";
/// The agent's work directory (the unit's `StateDirectory`), removed by `uninstall --purge`.
pub const WORK_DIR: &str = "/var/lib/cosmos-agent";
/// Staging directory in the SSH user's home, for the uploads (mode 0700).
const STAGING_DIR: &str = ".cosmos-install";
/// Free space the agent's work directory's file system needs at the least, in MiB.
pub const WORK_DIR_FREE_MIB_MIN: u64 = 1024;
/// Room beyond the binary itself wanted where it is staged and installed, in MiB.
const BIN_FREE_MARGIN_MIB: u64 = 16;
/// Default bound on the agent answering the handshake after a (re)start, and on the controller linking to it.
pub const HEALTH_TIMEOUT_S_DEFAULT: u64 = 60;
/// Pause between two health checks.
const HEALTH_RETRY_MS: u64 = 500;
/// Journal lines shown when the agent does not come up.
const JOURNAL_LINES: u32 = 40;

/// How to reach the host, as `cosmos agents add` takes it.
#[derive(clap::Args, Debug, Clone)]
pub struct SshArgs {
    /// `ssh://USER@HOST[:PORT]`; ~/.ssh/config may supply HostName, User, Port, IdentityFile and ProxyJump.
    pub url: String,
    /// Private key to offer (ed25519, ECDSA or RSA); registered with the host, so an absolute path the controller can read.
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// File holding the passphrase of an encrypted --identity (absolute path).
    #[arg(long, value_name = "FILE")]
    pub identity_passphrase_file: Option<PathBuf>,
    /// Go through this bastion: `ssh://USER@BASTION[:PORT]`.
    #[arg(long, value_name = "URL")]
    pub jump: Option<String>,
    /// Learn the host's key on first contact instead of refusing a host not in known_hosts; a changed key is still refused.
    #[arg(long)]
    pub accept_new_host_key: bool,
    /// The known_hosts file this command checks the host's key against (default ~/.ssh/known_hosts).
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// The ssh_config read for HostName, User, Port, IdentityFile, ProxyJump (default ~/.ssh/config).
    #[arg(long, value_name = "FILE")]
    pub ssh_config: Option<PathBuf>,
    /// Become root with `sudo -S`, reading the SSH user's sudo password from the first line of stdin
    /// (without it, a user other than root needs passwordless sudo).
    #[arg(long)]
    pub sudo_password_stdin: bool,
}

/// `cosmos agent install`'s own settings.
#[derive(clap::Args, Debug, Clone)]
pub struct InstallArgs {
    #[command(flatten)]
    pub ssh: SshArgs,
    /// The cosmos binary to install (default: this one): the glibc build, which the host's glibc must be new enough for.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// The controller's agent token (default: agent.token in --data-dir / COSMOS_DATA_DIR).
    #[arg(long, value_name = "FILE")]
    pub agent_token_file: Option<PathBuf>,
    /// Bound on the agent answering after a (re)start, and on the controller linking to it, in seconds.
    #[arg(long, default_value_t = HEALTH_TIMEOUT_S_DEFAULT)]
    pub health_timeout_s: u64,
    /// Further flags of the host's `cosmos agent`, after `--` (e.g. `-- --simulated-gpus 8x80GiB --runtime docker`).
    #[arg(last = true, value_name = "AGENT_FLAGS")]
    pub agent_flags: Vec<String>,
}

/// A root shell on the host: the login user is root, or `sudo` is used (with a password or without).
struct Host {
    session: Session,
    /// How it was reached, to reach it again.
    target: Target,
    opts: cosmos_ssh::Options,
    /// What this host is called in messages.
    name: String,
    /// `sudo -n`, `sudo -S` (with this password) or nothing (root).
    sudo: Sudo,
}

enum Sudo {
    Root,
    NoPassword,
    Password(String),
}

impl Host {
    /// Runs `script` with `sh -c` as root.
    async fn root_sh(&self, script: &str) -> anyhow::Result<ExecOutput> {
        let quoted = sh_quote(script);
        let out = match &self.sudo {
            Sudo::Root => self.session.exec(&format!("sh -c {quoted}"), b"").await?,
            Sudo::NoPassword => self.session.exec(&format!("sudo -n sh -c {quoted}"), b"").await?,
            // `-p ''`: no prompt mixed into the output; the password is the first line of stdin.
            Sudo::Password(pw) => {
                self.session.exec(&format!("sudo -S -p '' sh -c {quoted}"), format!("{pw}\n").as_bytes()).await?
            }
        };
        Ok(out)
    }

    /// Like [`Host::root_sh`], failing with the script's stderr when it does not exit 0.
    async fn root_ok(&self, what: &str, script: &str) -> anyhow::Result<String> {
        let out = self.root_sh(script).await?;
        if !out.success() {
            bail!(
                "{}: {what} failed (exit {}): {}",
                self.name,
                out.status.map_or_else(|| "by a signal".into(), |s| s.to_string()),
                one_line(&out.stderr_text())
            );
        }
        Ok(out.stdout_text())
    }
}

/// A command's stderr on one line: its non-empty lines joined with `; `, control characters escaped.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    crate::client::printable(&lines.join("; ")).into_owned()
}

/// `'…'` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The binary to install: its architecture, the glibc it needs, its bytes' sha256.
struct Binary {
    path: PathBuf,
    arch: &'static str,
    /// The newest `GLIBC_x.y` symbol version it links against; none for a static binary.
    glibc_needed: Option<GlibcVersion>,
    sha256: String,
    size_bytes: u64,
}

/// A glibc version, `2.36` as `(2, 36)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct GlibcVersion(u32, u32);

impl std::fmt::Display for GlibcVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

impl GlibcVersion {
    /// `2.36` (or `2.3.4`: the third part does not matter here).
    fn parse(text: &str) -> Option<GlibcVersion> {
        let mut parts = text.trim().split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.trim_end_matches(|c: char| !c.is_ascii_digit()).parse().ok()?;
        Some(GlibcVersion(major, minor))
    }

    /// The newest `GLIBC_x.y` a dynamically linked binary asks for. The version
    /// needs of its `.gnu.version_r` are names in its dynamic string table, so a
    /// scan for them finds every one (other mentions of glibc versions are the same names).
    fn needed_by(bytes: &[u8]) -> Option<GlibcVersion> {
        const TAG: &[u8] = b"GLIBC_";
        let mut newest = None;
        let mut at = 0;
        while let Some(i) = bytes[at..].windows(TAG.len()).position(|w| w == TAG) {
            let start = at + i + TAG.len();
            let end = bytes[start..]
                .iter()
                .position(|b| !(b.is_ascii_digit() || *b == b'.'))
                .map_or(bytes.len(), |n| start + n);
            if let Some(v) = std::str::from_utf8(&bytes[start..end]).ok().and_then(GlibcVersion::parse) {
                newest = newest.max(Some(v));
            }
            at = end.max(start);
        }
        newest
    }
}

/// Reads an ELF file's machine and whether it asks for a dynamic loader (`PT_INTERP`).
fn elf_facts(bytes: &[u8]) -> Result<(&'static str, bool), String> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err("it is not an ELF executable".into());
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err("it is not a 64-bit little-endian ELF executable".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    let arch = match u16_at(18) {
        62 => "x86_64",
        183 => "aarch64",
        other => return Err(format!("its ELF machine {other} is neither x86_64 nor aarch64")),
    };
    let (phoff, phentsize, phnum) = (u64_at(32) as usize, usize::from(u16_at(54)), usize::from(u16_at(56)));
    const PT_INTERP: u32 = 3;
    let mut dynamic = false;
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        if at + 4 > bytes.len() {
            return Err("its program headers are cut short".into());
        }
        dynamic |= u32_at(at) == PT_INTERP;
    }
    Ok((arch, dynamic))
}

fn build_hint(arch: &str) -> String {
    format!(
        "build cosmos for {arch} on a distribution no newer than the host's (its glibc sets the oldest \
         the binary runs on: `cargo build --release -p cosmos` there, or in a container of that distribution) \
         and pass --binary target/release/cosmos"
    )
}

impl Binary {
    fn choose(given: Option<&Path>) -> anyhow::Result<Binary> {
        let (path, ours) = match given {
            Some(p) => (p.to_path_buf(), false),
            None => (std::env::current_exe().context("finding this binary's own path")?, true),
        };
        let bytes = std::fs::read(&path).with_context(|| format!("reading the binary {}", path.display()))?;
        let (arch, dynamic) = elf_facts(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let glibc_needed = if dynamic {
            let needed = GlibcVersion::needed_by(&bytes);
            if needed.is_none() {
                bail!(
                    "{} is linked dynamically but not against glibc (no GLIBC_ symbol versions): hosts get the glibc build: {}",
                    path.display(),
                    build_hint(arch)
                );
            }
            needed
        } else {
            // A static (musl) program has no dlopen, so its agent could never load NVML.
            eprintln!(
                "warning: {} {} is linked statically: its agent cannot load the NVIDIA management library \
                 (static programs cannot load shared libraries) and will only run with --simulated-gpus; \
                 GPU hosts need the glibc build",
                if ours { "this cosmos" } else { "--binary" },
                path.display()
            );
            None
        };
        let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        Ok(Binary { path, arch, glibc_needed, sha256, size_bytes: bytes.len() as u64 })
    }
}

/// What the preflight found on the host.
#[derive(Debug, Default)]
struct Facts {
    arch: String,
    uid: String,
    user: String,
    init: String,
    systemd: bool,
    sudo_installed: bool,
    sudo_n: Option<String>,
    /// `(what, MiB free)` for the binary's, the staging and the work directory's file systems.
    free_mib: Vec<(String, u64)>,
    /// The host's glibc (`getconf GNU_LIBC_VERSION`); none where there is no glibc.
    glibc: Option<GlibcVersion>,
    installed_sha256: Option<String>,
}

const PREFLIGHT: &str = r#"
echo "arch=$(uname -m)"
echo "uid=$(id -u)"
echo "user=$(id -un)"
echo "init=$(cat /proc/1/comm 2>/dev/null)"
echo "glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null)"
[ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 && echo "systemd=yes"
command -v sudo >/dev/null 2>&1 && echo "sudo=yes"
for d in /usr/local/bin "$HOME" /var/lib; do
  p=$d; while [ ! -d "$p" ]; do p=$(dirname "$p"); done
  echo "free=$d $(df -Pk "$p" | tail -n 1)"
done
[ -f /usr/local/bin/cosmos ] && echo "installed=$(sha256sum < /usr/local/bin/cosmos | cut -d' ' -f1)"
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then
  if err=$(sudo -n true 2>&1); then echo "sudo_n=ok"; else echo "sudo_n=$(echo "$err" | tr '\n' ' ')"; fi
fi
true
"#;

fn parse_facts(out: &str) -> Facts {
    let mut f = Facts::default();
    for line in out.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        match k {
            "arch" => f.arch = v.into(),
            "uid" => f.uid = v.into(),
            "user" => f.user = v.into(),
            "init" => f.init = v.into(),
            "systemd" => f.systemd = true,
            "sudo" => f.sudo_installed = true,
            "sudo_n" => f.sudo_n = Some(v.trim().into()),
            "installed" => f.installed_sha256 = Some(v.trim().into()),
            // `glibc 2.36`
            "glibc" => f.glibc = v.trim().strip_prefix("glibc ").and_then(GlibcVersion::parse),
            "free" => {
                // `DIR FILESYSTEM 1024-BLOCKS USED AVAILABLE CAPACITY MOUNTED-ON`
                let mut parts = v.split_whitespace();
                let dir = parts.next().unwrap_or_default().to_string();
                if let Some(kib) = parts.nth(3).and_then(|a| a.parse::<u64>().ok()) {
                    f.free_mib.push((dir, kib / 1024));
                }
            }
            _ => {}
        }
    }
    f
}

fn ssh_options(args: &SshArgs) -> anyhow::Result<(Target, cosmos_ssh::Options)> {
    let target = Target::parse(&args.url).map_err(anyhow::Error::msg)?;
    let mut opts = cosmos_ssh::Options::new(AgentEndpoint::Socket(crate::ssh::AGENT_SOCKET_DEFAULT.into()));
    opts.identity = args.identity.clone();
    opts.passphrase_file = args.identity_passphrase_file.clone();
    opts.jump = args.jump.as_deref().map(Target::parse).transpose().map_err(|e| anyhow!("--jump {e}"))?;
    opts.host_keys =
        if args.accept_new_host_key { cosmos_ssh::HostKeyPolicy::AcceptNew } else { cosmos_ssh::HostKeyPolicy::Strict };
    if let Some(k) = args.known_hosts.clone().or_else(cosmos_ssh::known_hosts::default_path) {
        opts.known_hosts = k;
    }
    opts.ssh_config = args.ssh_config.clone();
    Ok((target, opts))
}

/// Asks for `key`'s passphrase on the controlling terminal, without echo; `None` without a terminal.
fn ask_passphrase(key: &Path) -> anyhow::Result<Option<String>> {
    use std::io::{BufRead, Write};
    use std::os::fd::AsRawFd;
    let Ok(tty) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty") else { return Ok(None) };
    let fd = tty.as_raw_fd();
    // SAFETY: termios is plain data, filled in by tcgetattr for our own descriptor.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr on an open terminal descriptor with a valid out-pointer.
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return Ok(None);
    }
    let mut quiet = saved;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    (&tty).write_all(format!("Enter passphrase for key {}: ", key.display()).as_bytes())?;
    // SAFETY: sets attributes read from the same terminal, echo off.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    let mut line = String::new();
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    // SAFETY: restores what tcgetattr read.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    read.context("reading the key's passphrase from the terminal")?;
    Ok(Some(line.trim_end_matches(['\n', '\r']).to_string()))
}

fn read_sudo_password(args: &SshArgs) -> anyhow::Result<Option<String>> {
    if !args.sudo_password_stdin {
        return Ok(None);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading the sudo password from stdin")?;
    let pw = line.strip_suffix('\n').unwrap_or(&line);
    let pw = pw.strip_suffix('\r').unwrap_or(pw);
    if pw.is_empty() {
        bail!("--sudo-password-stdin: stdin's first line is empty; give the SSH user's sudo password there");
    }
    Ok(Some(pw.to_string()))
}

/// Connects and checks that the host can be managed: systemd, root or sudo; returns the host and its facts.
async fn reach(args: &SshArgs, password: Option<String>) -> anyhow::Result<(Host, Facts)> {
    let (target, mut opts) = ssh_options(args)?;
    let mut connected = cosmos_ssh::connect(&target, &opts).await;
    if let Err(cosmos_ssh::SshError::KeyNeedsPassphrase { key }) = &connected {
        // At a terminal the passphrase is asked for, as ssh does; it stays in this process only.
        if let Some(typed) = ask_passphrase(key)? {
            opts.passphrase = Some(typed);
            connected = cosmos_ssh::connect(&target, &opts).await;
        }
    }
    let session = connected.map_err(|e| match e {
        cosmos_ssh::SshError::KeyNeedsPassphrase { .. } => {
            anyhow!("{target}: {e}; or run `cosmos agent install` at a terminal, which asks for it")
        }
        e => anyhow!("{target}: {e}"),
    })?;
    let name = target.host.clone();
    let out = session.exec(&format!("sh -c {}", sh_quote(PREFLIGHT)), b"").await?;
    if !out.success() {
        bail!("{name}: the preflight commands failed: {}", out.stderr_text());
    }
    let facts = parse_facts(&out.stdout_text());
    let user = if facts.user.is_empty() { session.user().to_string() } else { facts.user.clone() };
    if !facts.systemd {
        bail!(
            "{name} does not run systemd (PID 1 is `{}`): cosmos agent install sets the agent up as a systemd service, \
             which restarts it when it dies and starts it at boot. On a host without systemd, run \
             `cosmos agent --listen unix:{} …` under the host's own supervisor and register it with \
             `cosmos agents add {}`",
            if facts.init.is_empty() { "unknown" } else { &facts.init },
            crate::ssh::AGENT_SOCKET_DEFAULT,
            args.url
        );
    }
    let sudo = if facts.uid == "0" {
        Sudo::Root
    } else if !facts.sudo_installed {
        bail!(
            "{name}: {user} is not root and sudo is not installed; log in as root (ssh://root@{name}) or install sudo and give {user} sudo rights"
        );
    } else if let Some(pw) = password {
        Sudo::Password(pw)
    } else {
        match facts.sudo_n.as_deref() {
            Some("ok") => Sudo::NoPassword,
            Some(why) => bail!(
                "sudo asks for a password on {name} ({why}): give {user} NOPASSWD for these commands \
                 (a line `{user} ALL=(root) NOPASSWD: ALL` in /etc/sudoers.d/cosmos, edited with visudo), \
                 or pass --sudo-password-stdin and the password on stdin"
            ),
            None => bail!("{name}: sudo -n gave no answer"),
        }
    };
    let host = Host { session, target, opts, name, sudo };
    if let Sudo::Password(_) = host.sudo {
        let out = host.root_sh("true").await?;
        if !out.success() {
            bail!(
                "{}: sudo refused the password given on stdin for {user} ({}); check it, and that {user} may use sudo",
                host.name,
                one_line(&out.stderr_text())
            );
        }
    }
    Ok((host, facts))
}

/// `cosmos agent install`.
pub fn install(args: InstallArgs, client_args: &ClientArgs) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(install_async(args, client_args))
}

async fn install_async(args: InstallArgs, client_args: &ClientArgs) -> anyhow::Result<bool> {
    // Everything that can be checked here is, before the host is touched.
    let binary = Binary::choose(args.binary.as_deref())?;
    let token_file = match (&args.agent_token_file, &client_args.data_dir) {
        (Some(f), _) => f.clone(),
        (None, Some(dir)) => dir.join("agent.token"),
        (None, None) => bail!(
            "which agent token? give --agent-token-file FILE (the controller's DATA_DIR/agent.token), or --data-dir / COSMOS_DATA_DIR"
        ),
    };
    let token = Token::read_file(&token_file)?;
    for path in [&args.ssh.identity, &args.ssh.identity_passphrase_file].into_iter().flatten() {
        if !path.is_absolute() {
            bail!(
                "{} must be an absolute path: it is registered with the host, and the controller reads it",
                path.display()
            );
        }
    }
    let config = agent_config(&args.agent_flags)?;
    let client = Client::new(client_args)?;
    let _: Vec<HostView> = client.get("/v1/hosts").context(
        "the controller must be reachable (it registers the host at the end of the install): check COSMOS_CONTROLLER / --controller",
    )?;
    let entry = host_entry(&args.ssh);
    let password = read_sudo_password(&args.ssh)?;

    let (mut host, facts) = reach(&args.ssh, password).await?;
    let name = host.name.clone();
    if facts.arch != binary.arch {
        bail!(
            "{name} is {} but {} is built for {}: {}",
            facts.arch,
            binary.path.display(),
            binary.arch,
            build_hint(&facts.arch)
        );
    }
    if let Some(needed) = binary.glibc_needed {
        match facts.glibc {
            None => bail!(
                "{name} has no glibc (`getconf GNU_LIBC_VERSION` says nothing), and {} needs glibc {needed}: \
                 install the agent on a glibc distribution",
                binary.path.display()
            ),
            Some(have) if have < needed => bail!(
                "{name} has glibc {have}, older than the {needed} that {} needs: {}",
                binary.path.display(),
                build_hint(&facts.arch)
            ),
            Some(_) => {}
        }
    }
    let size_mib = binary.size_bytes.div_ceil(1024 * 1024);
    for (dir, free) in &facts.free_mib {
        let (need, why) = if dir == "/var/lib" {
            (WORK_DIR_FREE_MIB_MIN, format!("the agent's work directory {WORK_DIR}"))
        } else {
            (size_mib + BIN_FREE_MARGIN_MIB, format!("the {size_mib} MiB binary"))
        };
        if *free < need {
            bail!("{name} has {free} MiB free on {dir}, where {why} needs {need} MiB: free some space there");
        }
    }
    let how = match host.sudo {
        Sudo::Root => "as root".to_string(),
        Sudo::NoPassword => format!("as {} with sudo", facts.user),
        Sudo::Password(_) => format!("as {} with sudo (password from stdin)", facts.user),
    };
    println!("{name}: preflight ok: {}, systemd, {how}", facts.arch);

    // Uploads go to a private directory in the login user's home (SFTP starts there).
    let sftp = host.session.sftp().await?;
    if !sftp.try_exists(STAGING_DIR).await.unwrap_or(false) {
        sftp.create_dir(STAGING_DIR).await.map_err(|e| anyhow!("{name}: creating ~/{STAGING_DIR} over SFTP: {e}"))?;
    }
    let mut private = russh_sftp::protocol::FileAttributes::empty();
    private.permissions = Some(0o700);
    sftp.set_metadata(STAGING_DIR, private)
        .await
        .map_err(|e| anyhow!("{name}: chmod 700 ~/{STAGING_DIR} over SFTP: {e}"))?;
    let staging = sftp
        .canonicalize(STAGING_DIR)
        .await
        .map_err(|e| anyhow!("{name}: resolving ~/{STAGING_DIR} over SFTP: {e}"))?;

    let binary_changed = facts.installed_sha256.as_deref() != Some(binary.sha256.as_str());
    if binary_changed {
        let started = Instant::now();
        upload_file(&sftp, &binary.path, &format!("{staging}/cosmos"), 0o700)
            .await
            .map_err(|e| anyhow!("{name}: {e}"))?;
        let secs = started.elapsed().as_secs_f64();
        let out = host
            .root_ok(
                "installing the binary",
                &format!(
                    "set -e\nmkdir -p /usr/local/bin\ninstall -m 0755 -o root -g root {src} /usr/local/bin/.cosmos.new\n\
                     got=$(sha256sum < /usr/local/bin/.cosmos.new | cut -d' ' -f1)\n\
                     if [ \"$got\" != {sha} ]; then rm -f /usr/local/bin/.cosmos.new; echo \"badsum=$got\"; exit 0; fi\n\
                     mv -f /usr/local/bin/.cosmos.new {BIN_PATH}\nrm -f {src}\necho installed",
                    src = sh_quote(&format!("{staging}/cosmos")),
                    sha = binary.sha256,
                ),
            )
            .await?;
        if let Some(got) = out.lines().find_map(|l| l.strip_prefix("badsum=")) {
            bail!(
                "{name}: the uploaded binary's sha256 on the host is {got}, not {} as sent: the upload was damaged; run the install again",
                binary.sha256
            );
        }
        println!(
            "{name}: binary: uploaded {} ({size_mib} MiB in {secs:.1} s), sha256 {} verified on the host, moved into place as {BIN_PATH}",
            binary.path.display(),
            short(&binary.sha256)
        );
    } else {
        println!("{name}: binary: {BIN_PATH} is up to date (sha256 {}); not uploaded", short(&binary.sha256));
    }

    let files: [(&str, &str, &str, Vec<u8>); 4] = [
        ("token", "agent.token", TOKEN_PATH, format!("{}\n", token.0).into_bytes()),
        ("settings", "agent.toml", AGENT_TOML_PATH, AGENT_TOML_TEXT.as_bytes().to_vec()),
        ("config", "agent.env", CONFIG_PATH, config.into_bytes()),
        ("unit", "cosmos-agent.service", UNIT_PATH, UNIT_TEXT.as_bytes().to_vec()),
    ];
    for (_, file, _, bytes) in &files {
        write_remote(&sftp, &format!("{staging}/{file}"), bytes, 0o600).await.map_err(|e| anyhow!("{name}: {e}"))?;
    }
    let _ = sftp.close().await;
    let mut script = format!(
        "set -e\nS={}\ntrap 'rm -rf \"$S\"' EXIT\n\
         put() {{ if [ -f \"$3\" ] && [ \"$(sha256sum < \"$2\")\" = \"$(sha256sum < \"$3\")\" ] \
             && [ \"$(stat -c %U:%G \"$3\")\" = \"$5\" ]; then echo \"same=$1\"; \
         else install -m \"$4\" -o \"${{5%:*}}\" -g \"${{5#*:}}\" \"$2\" \"$3.new\"; mv -f \"$3.new\" \"$3\"; echo \"changed=$1\"; fi; }}\n",
        sh_quote(&staging)
    );
    // The user first: the token is given to it (the agent runs as it and refuses a token others can read).
    script.push_str(&format!(
        "getent group {GROUP} >/dev/null || {{ groupadd --system {GROUP}; echo group=created; }}\n\
         getent passwd {USER} >/dev/null || {{ useradd --system --gid {GROUP} --home-dir {WORK_DIR} --no-create-home \
             --shell /usr/sbin/nologin --comment 'Cosmos agent' {USER}; echo user=created; }}\n\
         install -d -o root -g {GROUP} -m 0750 /etc/cosmos\n"
    ));
    script.push_str(&format!("put token \"$S/agent.token\" {TOKEN_PATH} 0600 {USER}:{GROUP}\n"));
    script.push_str(&format!(
        "if [ -e {AGENT_TOML_PATH} ]; then echo same=settings; else put settings \"$S/agent.toml\" {AGENT_TOML_PATH} 0640 root:{GROUP}; fi\n"
    ));
    script.push_str(&format!("put config \"$S/agent.env\" {CONFIG_PATH} 0644 root:root\n"));
    script.push_str(&format!("put unit \"$S/cosmos-agent.service\" {UNIT_PATH} 0644 root:root\n"));
    // Docker's socket is its group's: an agent running containers as the cosmos user needs it.
    script.push_str(&format!(
        "if grep -Eq -- '--runtime[= ]docker' {CONFIG_PATH} && getent group docker >/dev/null \
             && ! id -nG {USER} | tr ' ' '\\n' | grep -qx docker; then usermod -aG docker {USER}; echo docker=added; fi\n"
    ));
    if !matches!(host.sudo, Sudo::Root) {
        let user = sh_quote(&facts.user);
        script.push_str(&format!(
            "id -nG {user} | tr ' ' '\\n' | grep -qx {GROUP} || {{ usermod -aG {GROUP} {user}; echo member=added; }}\n"
        ));
    }
    let out = host.root_ok("writing the token, config and unit", &script).await?;
    let mut changed = binary_changed;
    let mut unit_changed = false;
    for (what, _, path, _) in &files {
        if out.lines().any(|l| l == format!("changed={what}")) {
            changed = true;
            unit_changed |= *what == "unit";
            println!("{name}: {what}: wrote {path}");
        } else {
            println!("{name}: {what}: {path} unchanged");
        }
    }
    if out.lines().any(|l| l == "group=created") {
        println!("{name}: created the group {GROUP} (the agent's socket belongs to it)");
    }
    if out.lines().any(|l| l == "user=created") {
        println!("{name}: created the system user {USER} (the agent runs as it)");
    }
    if out.lines().any(|l| l == "docker=added") {
        println!("{name}: added {USER} to the group docker (the agent runs jobs as containers)");
    }
    if out.lines().any(|l| l == "member=added") {
        println!(
            "{name}: added {} to the group {GROUP}, so SSH sessions as {} may reach the agent's socket",
            facts.user, facts.user
        );
        // A session keeps the groups it logged in with: the health check needs a new one.
        host.session =
            cosmos_ssh::connect(&host.target, &host.opts).await.map_err(|e| anyhow!("{}: {e}", host.target))?;
    }

    let mut script = String::from("set -e\n");
    if unit_changed {
        script.push_str("systemctl daemon-reload\necho reloaded\n");
    }
    script.push_str(&format!(
        "systemctl is-enabled --quiet {UNIT} 2>/dev/null || {{ systemctl enable --quiet {UNIT}; echo enabled; }}\n\
         if systemctl is-active --quiet {UNIT}; then active=1; else active=; fi\n"
    ));
    if changed {
        script.push_str(&format!(
            "systemctl restart {UNIT}\nif [ -n \"$active\" ]; then echo restarted; else echo started; fi\n"
        ));
    } else {
        script.push_str(&format!(
            "if [ -n \"$active\" ]; then echo running; else systemctl start {UNIT}; echo started; fi\n"
        ));
    }
    let out = host.root_ok("starting the service", &script).await;
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            print_diagnostics(&host).await;
            return Err(e);
        }
    };
    if out.lines().any(|l| l == "reloaded") {
        println!("{name}: systemd: daemon-reload (the unit changed)");
    }
    if out.lines().any(|l| l == "enabled") {
        println!("{name}: service: enabled {UNIT} (starts at boot)");
    }
    if out.lines().any(|l| l == "restarted") {
        println!("{name}: service: restarted {UNIT} (something changed)");
    } else if out.lines().any(|l| l == "started") {
        println!("{name}: service: started {UNIT}");
    } else {
        println!("{name}: service: {UNIT} is running; not restarted (nothing changed)");
    }

    let deadline = Instant::now() + Duration::from_secs(args.health_timeout_s);
    match health(&host, &token, deadline).await {
        Ok(report) => println!("{name}: healthy: {report}"),
        Err(e) => {
            print_diagnostics(&host).await;
            bail!("{name}: the agent did not answer through SSH within {} s: {e}", args.health_timeout_s);
        }
    }

    let view: HostView = client.post("/v1/hosts", &entry)?;
    println!("{}: registered with the controller ({})", view.name, view.entry.url);
    loop {
        let hosts: Vec<HostView> = client.get("/v1/hosts")?;
        let now = hosts.into_iter().find(|h| h.name == view.name);
        match now {
            Some(h) if h.state == "connected" => {
                println!("{}: the controller is linked to its agent", h.name);
                return Ok(true);
            }
            Some(h) if Instant::now() >= deadline => {
                bail!(
                    "{}: the controller has not linked to the agent within {} s: {} ({})",
                    h.name,
                    args.health_timeout_s,
                    h.state,
                    h.error.unwrap_or_default()
                );
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(HEALTH_RETRY_MS)).await,
            None => bail!("{}: the controller forgot the host just registered (was it removed meanwhile?)", view.name),
        }
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

fn host_entry(ssh: &SshArgs) -> HostEntry {
    HostEntry {
        url: ssh.url.clone(),
        identity: ssh.identity.clone(),
        passphrase_file: ssh.identity_passphrase_file.clone(),
        jump: ssh.jump.clone(),
        socket: None,
        port: None,
        accept_new_host_key: ssh.accept_new_host_key,
    }
}

/// The unit's `EnvironmentFile`: the agent's further flags, split on spaces by systemd.
fn agent_config(flags: &[String]) -> anyhow::Result<String> {
    for f in flags {
        if f.is_empty() || f.chars().any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | '$' | '%')) {
            bail!(
                "the agent flag `{}` cannot pass through the unit's environment file (no spaces, quotes, backslashes, $ or %)",
                crate::client::printable(f)
            );
        }
    }
    let fixed = ["--listen", "--listen-group", "--token-file", "--work-dir", "--controller"];
    if let Some(f) = flags.iter().find(|f| fixed.iter().any(|x| f.as_str() == *x || f.starts_with(&format!("{x}=")))) {
        bail!("the agent flag {f} is set by the installed {AGENT_TOML_PATH}; leave it out");
    }
    // The flags must be ones `cosmos agent` takes: checked here, not by an agent that fails on the host.
    let mut argv = vec!["cosmos", "agent", "--listen", "unix:/x", "--token-file", "/x", "--work-dir", "/x"];
    argv.extend(flags.iter().map(String::as_str));
    if let Err(e) = <crate::Cli as clap::Parser>::try_parse_from(&argv) {
        bail!("the agent flags after -- are not ones `cosmos agent` takes: {}", e.to_string().trim());
    }
    Ok(format!(
        "# Written by `cosmos agent install`: the agent's flags beyond those in {UNIT}.\nCOSMOS_AGENT_ARGS={}\n",
        flags.join(" ")
    ))
}

async fn upload_file(
    sftp: &russh_sftp::client::SftpSession,
    local: &Path,
    remote: &str,
    mode: u32,
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut src =
        tokio::fs::File::open(local).await.with_context(|| format!("opening {} to upload", local.display()))?;
    let mut dst = open_remote(sftp, remote, mode).await?;
    tokio::io::copy(&mut src, &mut dst).await.with_context(|| format!("uploading to {remote} over SFTP"))?;
    dst.shutdown().await.with_context(|| format!("finishing {remote} over SFTP"))?;
    Ok(())
}

async fn write_remote(
    sftp: &russh_sftp::client::SftpSession,
    remote: &str,
    bytes: &[u8],
    mode: u32,
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut dst = open_remote(sftp, remote, mode).await?;
    dst.write_all(bytes).await.with_context(|| format!("writing {remote} over SFTP"))?;
    dst.shutdown().await.with_context(|| format!("finishing {remote} over SFTP"))?;
    Ok(())
}

async fn open_remote(
    sftp: &russh_sftp::client::SftpSession,
    remote: &str,
    mode: u32,
) -> anyhow::Result<russh_sftp::client::fs::File> {
    use russh_sftp::protocol::{FileAttributes, OpenFlags};
    let mut attrs = FileAttributes::empty();
    attrs.permissions = Some(mode);
    sftp.open_with_flags_and_attributes(remote, OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE, attrs)
        .await
        .map_err(|e| anyhow!("creating {remote} over SFTP: {e}"))
}

/// The controller's handshake, over an SSH channel to the agent's socket, until
/// the agent answers or the deadline passes. The agent's hello is then refused
/// on purpose: this is a check, and the agent's one controller slot is left for
/// the controller.
async fn health(host: &Host, token: &Token, deadline: Instant) -> anyhow::Result<String> {
    let endpoint = AgentEndpoint::Socket(crate::ssh::AGENT_SOCKET_DEFAULT.into());
    loop {
        let (e, retry) = match handshake_once(host, token, &endpoint).await {
            Ok(report) => return Ok(report),
            Err(Failed::Ssh(e)) => {
                let retry = cosmos_proto::Classify::is_retryable(&e);
                (anyhow::Error::from(e), retry)
            }
            Err(Failed::Handshake(e)) => {
                let retry = cosmos_proto::Classify::is_retryable(&e);
                (anyhow!("the handshake with the agent failed: {e}"), retry)
            }
        };
        if !retry || Instant::now() >= deadline {
            return Err(e);
        }
        // An agent that exited will not answer: say so at once.
        if let Ok(state) = host.root_sh(&format!("systemctl is-active {UNIT}")).await
            && state.stdout_text().trim() == "failed"
        {
            bail!("{UNIT} failed ({e})");
        }
        tokio::time::sleep(Duration::from_millis(HEALTH_RETRY_MS)).await;
    }
}

/// Why one health check failed: the channel, or the handshake on it.
enum Failed {
    Ssh(cosmos_ssh::SshError),
    Handshake(HandshakeError),
}

async fn handshake_once(host: &Host, token: &Token, endpoint: &AgentEndpoint) -> Result<String, Failed> {
    let stream = host.session.agent_channel(endpoint).await.map_err(Failed::Ssh)?;
    let mut conn = cosmos_proto::Connection::new(stream, handshake::HELLO_FRAME_BYTES_MAX);
    let hello =
        Hello { role: Role::Controller, node_id: "cosmos-agent-install".into(), token: token.clone(), incarnation: 0 };
    let timeout_ms = handshake::DEFAULT_HANDSHAKE_TIMEOUT_MS;
    match handshake::dial_agent(&mut conn, &hello, timeout_ms).await {
        Ok(_) => {}
        // The only refusal a listening agent gives a controller that holds the
        // token (checked first) is that it serves another one: it is up.
        Err(HandshakeError::Refused(Refusal::Other(why))) => {
            let why = why.split(", and serves one controller").next().unwrap_or_default();
            return Ok(format!("the agent answered the handshake over SSH ({endpoint}): {why}"));
        }
        Err(e) => return Err(Failed::Handshake(e)),
    }
    let mut agent = String::new();
    let check = |h: Hello| {
        agent = h.node_id;
        async { Err(Refusal::Other("a health check by cosmos agent install, not a controller; closing".into())) }
    };
    match handshake::accept_checked(&mut conn, &hello.node_id, Role::Agent, token, timeout_ms, check).await {
        Err(HandshakeError::RefusedPeer(Refusal::Other(_))) => {
            Ok(format!("agent `{agent}` answered the controller's handshake over SSH ({endpoint})"))
        }
        Ok(_) => unreachable!("the check refuses every hello"),
        Err(e) => Err(Failed::Handshake(e)),
    }
}

async fn print_diagnostics(host: &Host) {
    let script = format!(
        "systemctl status --no-pager --full {UNIT} 2>&1; journalctl --no-pager -n {JOURNAL_LINES} -u {UNIT} 2>&1"
    );
    match host.root_sh(&script).await {
        Ok(out) => {
            eprintln!("{}: systemctl status and the last {JOURNAL_LINES} lines of the journal for {UNIT}:", host.name);
            for line in out.stdout_text().lines() {
                eprintln!("  {}", crate::client::printable(line));
            }
        }
        Err(e) => eprintln!("{}: could not read systemctl status: {e:#}", host.name),
    }
}

/// `cosmos agent uninstall`'s settings.
#[derive(clap::Args, Debug, Clone)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub ssh: SshArgs,
    /// Also remove the agent's work directory (/var/lib/cosmos-agent: attempt logs, the input cache).
    #[arg(long)]
    pub purge: bool,
}

/// `cosmos agent uninstall`: unregisters the host, stops and disables the service,
/// kills what it left running, and removes what install wrote.
pub fn uninstall(args: UninstallArgs, client_args: &ClientArgs) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let client = Client::new(client_args)?;
        let target = Target::parse(&args.ssh.url).map_err(anyhow::Error::msg)?;
        let password = read_sudo_password(&args.ssh)?;
        let (host, _) = reach(&args.ssh, password).await?;
        // First, so the controller stops redialing a host going away.
        match client.delete::<HostEntry>(&format!("/v1/hosts/{}", target.host)) {
            Ok(entry) => println!("{}: unregistered from the controller ({})", target.host, entry.url),
            Err(e) => println!("{}: not unregistered: {e:#}", target.host),
        }
        let purge = if args.purge { format!("rm -rf {WORK_DIR}\necho purged\n") } else { String::new() };
        // The config file goes when it is still the one install wrote (or with --purge); an edited one is the operator's.
        let shipped = hex::encode(sha2::Sha256::digest(AGENT_TOML_TEXT.as_bytes()));
        let settings = format!(
            "if [ -f {AGENT_TOML_PATH} ]; then\n\
               if [ -n \"{purge_flag}\" ] || [ \"$(sha256sum < {AGENT_TOML_PATH} | cut -d' ' -f1)\" = {shipped} ]; then\n\
                 rm -f {AGENT_TOML_PATH}; echo removed={AGENT_TOML_PATH}\n\
               else echo kept={AGENT_TOML_PATH}; fi\n\
             fi\n",
            purge_flag = if args.purge { "1" } else { "" },
        );
        let script = format!(
            "if [ -f {UNIT_PATH} ]; then\n\
               systemctl disable --now --quiet {UNIT} 2>/dev/null || true\n\
               systemctl kill --signal=SIGKILL {UNIT} 2>/dev/null || true\n\
               echo stopped\n\
             fi\n\
             for f in {UNIT_PATH} {BIN_PATH} {TOKEN_PATH} {CONFIG_PATH}; do [ -e \"$f\" ] && rm -f \"$f\" && echo \"removed=$f\"; done\n\
             {settings}\
             rmdir /etc/cosmos 2>/dev/null || true\n\
             systemctl daemon-reload\n\
             systemctl reset-failed {UNIT} 2>/dev/null || true\n{purge}"
        );
        let out = host.root_ok("removing the agent", &script).await?;
        if out.lines().any(|l| l == "stopped") {
            println!("{}: service: stopped and disabled {UNIT}; what it left running was killed", host.name);
        } else {
            println!("{}: service: {UNIT} was not installed", host.name);
        }
        for path in out.lines().filter_map(|l| l.strip_prefix("removed=")) {
            println!("{}: removed {path}", host.name);
        }
        for path in out.lines().filter_map(|l| l.strip_prefix("kept=")) {
            println!("{}: kept {path}: it was edited on the host; --purge removes it", host.name);
        }
        if out.lines().any(|l| l == "purged") {
            println!("{}: removed {WORK_DIR}", host.name);
        } else {
            println!("{}: kept {WORK_DIR} (attempt logs, input cache); --purge removes it", host.name);
        }
        Ok(true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn preflight_output_parses() {
        let f = parse_facts(
            "arch=x86_64\nuid=1000\nuser=ops\ninit=systemd\nsystemd=yes\nsudo=yes\n\
             free=/usr/local/bin /dev/vda 263174212 13000000 82000000 14% /\nsudo_n=sudo: a password is required \n",
        );
        assert_eq!((f.arch.as_str(), f.uid.as_str(), f.systemd, f.sudo_installed), ("x86_64", "1000", true, true));
        assert_eq!(f.free_mib, vec![("/usr/local/bin".to_string(), 82_000_000 / 1024)]);
        assert_eq!(f.sudo_n.as_deref(), Some("sudo: a password is required"));
        assert_eq!(f.installed_sha256, None);
    }

    #[test]
    fn agent_flags_are_checked_before_the_host_is_touched() {
        let ok = agent_config(&["--simulated-gpus".into(), "2x80GiB".into()]).unwrap();
        assert!(ok.contains("COSMOS_AGENT_ARGS=--simulated-gpus 2x80GiB\n"), "{ok}");
        let e = agent_config(&["--no-such-flag".into()]).unwrap_err().to_string();
        assert!(e.contains("--no-such-flag"), "{e}");
        let e = agent_config(&["--listen".into(), "unix:/y".into()]).unwrap_err().to_string();
        assert!(e.contains("set by the installed /etc/cosmos/agent.toml"), "{e}");
        let e = agent_config(&["--name".into(), "a b".into()]).unwrap_err().to_string();
        assert!(e.contains("no spaces"), "{e}");
    }

    #[test]
    fn the_running_test_binary_links_glibc_and_names_the_newest_version_it_needs() {
        // Test binaries link glibc dynamically, as the binary hosts get does.
        let me = std::env::current_exe().unwrap();
        let (arch, dynamic) = elf_facts(&std::fs::read(&me).unwrap()).unwrap();
        assert_eq!(arch, std::env::consts::ARCH);
        assert!(dynamic);
        let chosen = Binary::choose(Some(&me)).unwrap();
        let needed = chosen.glibc_needed.expect("a glibc binary names its glibc");
        // Every glibc since 2.2.5 on x86_64 (2.17 on aarch64) carries a version this or newer.
        assert!(needed >= GlibcVersion(2, 17), "{needed}");
        // This machine runs it, so its own glibc is at least as new.
        let here = std::process::Command::new("getconf").arg("GNU_LIBC_VERSION").output().unwrap();
        let here = String::from_utf8_lossy(&here.stdout);
        let here = GlibcVersion::parse(here.trim().strip_prefix("glibc ").unwrap()).unwrap();
        assert!(here >= needed, "glibc {here} here, {needed} needed");
        assert!(elf_facts(b"#!/bin/sh\n").is_err());
    }

    #[test]
    fn glibc_versions_are_read_and_ordered_as_numbers() {
        let bytes = b"\0GLIBC_2.2.5\0GLIBC_2.34\0GLIBC_PRIVATE\0GLIBC_2.9\0GLIBC_\0libc.so.6\0GLIBC_2.17";
        assert_eq!(GlibcVersion::needed_by(bytes), Some(GlibcVersion(2, 34)));
        assert_eq!(GlibcVersion::needed_by(b"no versions here"), None);
        assert!(GlibcVersion(2, 9) < GlibcVersion(2, 10));
        let f = parse_facts("arch=x86_64\nglibc=glibc 2.36\n");
        assert_eq!(f.glibc, Some(GlibcVersion(2, 36)));
        assert_eq!(parse_facts("glibc=\n").glibc, None, "a musl host's getconf says nothing");
    }
}
