//! The SSH transport against real OpenSSH: each test starts its own `sshd -D`
//! on a loopback high port, with its own host key, `UsePAM no`,
//! `StrictModes no` and stream-local forwarding allowed, and plays the agent
//! on a Unix socket (or loopback port) behind it. The transport contract
//! suite runs over the channels; then host keys, key types, ssh-agent, a jump
//! host and keepalive through a stopped sshd.
//!
//! Needs Debian's openssh-server and openssh-client (`scripts/setup` installs
//! them); without them every test fails, saying so.

#[path = "../../proto/tests/common/transport_contract.rs"]
mod contract;

use cosmos_proto::BoxStream;
use cosmos_ssh::{AgentEndpoint, HostKeyPolicy, Options, SshError, Target};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SSHD: &str = "/usr/sbin/sshd";

/// Ports tried before an sshd gives up (another test may take a port first).
const SSHD_START_TRIES_MAX: u32 = 5;

fn need(tool: &str) -> PathBuf {
    let found = ["/usr/bin", "/usr/sbin", "/bin"].iter().map(|d| Path::new(d).join(tool)).find(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!("{tool} is not installed: the SSH tests need Debian's openssh-server and openssh-client (scripts/setup installs them)")
    })
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ssh-keygen -t TYPE -f PATH -N PASSPHRASE`.
/// A file only its owner may read, as a passphrase file must be.
fn secret_file(path: &Path, text: &str) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    path.to_path_buf()
}

fn keygen(path: &Path, kind: &str, passphrase: &str) -> PathBuf {
    let mut cmd = Command::new(need("ssh-keygen"));
    cmd.args(["-q", "-t", kind, "-N", passphrase, "-C", kind, "-f"]).arg(path);
    if kind == "rsa" {
        cmd.args(["-b", "3072"]);
    }
    run(&mut cmd);
    path.to_path_buf()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An sshd of the test's own, killed with the test.
struct Sshd {
    child: Child,
    port: u16,
    host_key: PathBuf,
    dir: PathBuf,
}

impl Sshd {
    /// Starts one that lets in the public keys of `authorized`, as root.
    fn start(dir: &Path, name: &str, authorized: &[&Path]) -> Sshd {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        // sshd's privilege separation directory must exist.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let host_key = keygen(&dir.join("host_ed25519"), "ed25519", "");
        let mut keys = String::new();
        for k in authorized {
            keys.push_str(&std::fs::read_to_string(k.with_extension("pub")).unwrap());
        }
        std::fs::write(dir.join("authorized_keys"), keys).unwrap();
        need("ssh-keygen");
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is not installed: install Debian's openssh-server (scripts/setup does)"
        );
        // A port free when asked may be taken by another test's sshd before this one binds it;
        // then connecting would reach that sshd. Readiness is this sshd saying it listens.
        for _ in 0..SSHD_START_TRIES_MAX {
            let port = free_port();
            let config = dir.join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "ListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\nUsePAM no\nStrictModes no\n\
                     PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                     AllowStreamLocalForwarding yes\nAllowTcpForwarding yes\nLogLevel VERBOSE\n",
                    host_key.display(),
                    dir.join("authorized_keys").display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
            let child = Command::new(SSHD)
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .args(["-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("starting sshd");
            let mut sshd = Sshd { child, port, host_key: host_key.clone(), dir: dir.clone() };
            let listening = format!("Server listening on 127.0.0.1 port {port}");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                if sshd.log().contains(&listening) {
                    return sshd;
                }
                if sshd.child.try_wait().unwrap().is_some() {
                    break; // Lost the port: try another.
                }
                assert!(std::time::Instant::now() < deadline, "sshd did not listen; its log:\n{}", sshd.log());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!(
            "sshd found no free port in {SSHD_START_TRIES_MAX} tries; its last log:\n{}",
            std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// The known_hosts line for this sshd, as `ssh-keyscan` would print it.
    fn known_hosts_line(&self) -> String {
        let public = std::fs::read_to_string(self.host_key.with_extension("pub")).unwrap();
        let mut parts = public.split_whitespace();
        format!("[127.0.0.1]:{} {} {}\n", self.port, parts.next().unwrap(), parts.next().unwrap())
    }

    fn target(&self) -> Target {
        Target { user: Some("root".into()), host: "127.0.0.1".into(), port: Some(self.port) }
    }

    /// The sshd and every process it forked (each connection's session process).
    fn processes(&self) -> Vec<i32> {
        let mut pids = vec![self.child.id() as i32];
        let mut i = 0;
        while i < pids.len() {
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
                let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
                // Fields after the command's closing parenthesis: state, ppid, …
                let ppid =
                    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
                if ppid == Some(pids[i]) && !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
            i += 1;
        }
        pids
    }

    fn signal_all(&self, signal: i32) {
        for pid in self.processes() {
            // SAFETY: kill(2) on processes this test started.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.signal_all(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's side of a listening agent: a Unix socket whose connections the test takes.
struct AgentSocket {
    path: PathBuf,
    listener: tokio::net::UnixListener,
}

impl AgentSocket {
    fn bind(dir: &Path) -> AgentSocket {
        let path = dir.join("agent.sock");
        let _ = std::fs::remove_file(&path);
        AgentSocket { listener: tokio::net::UnixListener::bind(&path).unwrap(), path }
    }

    fn endpoint(&self) -> AgentEndpoint {
        AgentEndpoint::Socket(self.path.to_string_lossy().into_owned())
    }
}

/// The next connection to the agent's socket, within a bound (a failed dial never comes).
async fn accept(
    l: &tokio::net::UnixListener,
) -> std::io::Result<(tokio::net::UnixStream, tokio::net::unix::SocketAddr)> {
    tokio::time::timeout(Duration::from_secs(30), l.accept()).await.expect("the channel reaches the agent's socket")
}

async fn accept_tcp(l: &tokio::net::TcpListener) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    tokio::time::timeout(Duration::from_secs(30), l.accept()).await.expect("the channel reaches the agent's port")
}

fn options(dir: &Path, endpoint: AgentEndpoint, key: &Path, known: &str) -> Options {
    let known_hosts = dir.join(format!("known_hosts-{}", rand_suffix()));
    std::fs::write(&known_hosts, known).unwrap();
    let mut opts = Options::new(endpoint);
    opts.identity = Some(key.to_path_buf());
    opts.known_hosts = known_hosts;
    opts.ssh_config = Some(dir.join("empty_ssh_config"));
    std::fs::write(dir.join("empty_ssh_config"), "").unwrap();
    opts.agent_socket = None;
    opts
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn open(sshd: &Sshd, opts: &Options) -> Result<cosmos_ssh::SshStream, SshError> {
    tokio::time::timeout(Duration::from_secs(30), cosmos_ssh::open(&sshd.target(), opts)).await.expect("ssh in time")
}

/// Dials the agent through `sshd`, then takes the connection that reached it. The dial comes
/// first (the connection waits in the listener's backlog), so a failed dial panics with its
/// own error and sshd's log instead of a wait for a connection that never comes.
async fn dial<A, R>(
    sshd: &Sshd,
    opts: &Options,
    accepted: impl std::future::Future<Output = std::io::Result<(A, R)>>,
) -> (cosmos_ssh::SshStream, A) {
    let c = open(sshd, opts).await.unwrap_or_else(|e| panic!("{e}\nsshd log:\n{}", sshd.log()));
    (c, accepted.await.expect("the agent accepts").0)
}

/// A key, an sshd that lets it in, and a known_hosts that knows the sshd.
struct Setup {
    dir: tempfile::TempDir,
    key: PathBuf,
    sshd: Sshd,
}

fn setup(kind: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(&dir.path().join(format!("id_{kind}")), kind, "");
    let sshd = Sshd::start(dir.path(), "sshd", &[&key]);
    Setup { dir, key, sshd }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_channels_keep_the_transport_contract() {
    let s = setup("ed25519");
    let agent = AgentSocket::bind(s.dir.path());
    let opts = options(s.dir.path(), agent.endpoint(), &s.key, &s.sshd.known_hosts_line());
    // direct-streamlocal to the agent's Unix socket.
    contract::run_all(|| async {
        let (c, a) = dial(&s.sshd, &opts, accept(&agent.listener)).await;
        (Box::new(c) as BoxStream, Box::new(a) as BoxStream)
    })
    .await;
    // direct-tcpip to the agent's loopback port.
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut opts = opts.clone();
    opts.agent = AgentEndpoint::Port(tcp.local_addr().unwrap().port());
    contract::run_all(|| async {
        let (c, a) = dial(&s.sshd, &opts, accept_tcp(&tcp)).await;
        (Box::new(c) as BoxStream, Box::new(a) as BoxStream)
    })
    .await;
}

#[tokio::test]
async fn an_unknown_host_is_refused_with_the_line_that_would_trust_it() {
    let s = setup("ed25519");
    let agent = AgentSocket::bind(s.dir.path());
    let opts = options(s.dir.path(), agent.endpoint(), &s.key, "");
    let e = open(&s.sshd, &opts).await.err().expect("an unknown host is refused");
    let SshError::UnknownHostKey { line, .. } = &e else { panic!("{e}") };
    // The line is what OpenSSH's own ssh-keyscan prints for the host.
    let scanned =
        run(Command::new(need("ssh-keyscan")).args(["-t", "ed25519", "-p", &s.sshd.port.to_string(), "127.0.0.1"]));
    assert_eq!(scanned.trim(), line, "{e}");
    let message = e.to_string();
    assert!(message.contains("ssh-keyscan -p") && message.contains("--accept-new-host-key"), "{message}");
    assert!(message.contains(&opts.known_hosts.display().to_string()), "{message}");
}

#[tokio::test]
async fn accept_new_learns_the_host_and_a_changed_key_is_refused_naming_the_line() {
    let s = setup("ed25519");
    let agent = AgentSocket::bind(s.dir.path());
    let mut opts = options(s.dir.path(), agent.endpoint(), &s.key, "# fleet\n");
    opts.host_keys = HostKeyPolicy::AcceptNew;
    open(&s.sshd, &opts).await.expect("accept-new learns an unknown host");
    let learned = std::fs::read_to_string(&opts.known_hosts).unwrap();
    assert_eq!(learned, format!("# fleet\n{}", s.sshd.known_hosts_line()));
    // Learned: now strict checking passes too.
    opts.host_keys = HostKeyPolicy::Strict;
    open(&s.sshd, &opts).await.expect("a learned host is known");

    // Another key recorded for the host: refused, strict or accept-new alike.
    let other = keygen(&s.dir.path().join("other_host_key"), "ed25519", "");
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let mut parts = other_pub.split_whitespace();
    let changed = format!("# fleet\n[127.0.0.1]:{} {} {}\n", s.sshd.port, parts.next().unwrap(), parts.next().unwrap());
    std::fs::write(&opts.known_hosts, changed).unwrap();
    for policy in [HostKeyPolicy::Strict, HostKeyPolicy::AcceptNew] {
        opts.host_keys = policy;
        let e = open(&s.sshd, &opts).await.err().expect("a changed key is refused");
        assert!(matches!(e, SshError::ChangedHostKey { line: 2, .. }), "{e}");
        let message = e.to_string();
        assert!(message.contains("CHANGED") && message.contains("line 2"), "{message}");
        assert!(message.contains(&opts.known_hosts.display().to_string()), "{message}");
    }
}

#[tokio::test]
async fn hashed_known_hosts_entries_are_honoured() {
    let s = setup("ed25519");
    let agent = AgentSocket::bind(s.dir.path());
    let opts = options(s.dir.path(), agent.endpoint(), &s.key, &s.sshd.known_hosts_line());
    run(Command::new(need("ssh-keygen")).arg("-H").arg("-f").arg(&opts.known_hosts));
    let hashed = std::fs::read_to_string(&opts.known_hosts).unwrap();
    assert!(hashed.starts_with("|1|"), "{hashed}");
    open(&s.sshd, &opts).await.expect("a hashed entry is found");
}

/// Authentication with `kind`'s key: the channel then carries a handshake.
async fn authenticates_with(kind: &str) {
    let s = setup(kind);
    let agent = AgentSocket::bind(s.dir.path());
    let opts = options(s.dir.path(), agent.endpoint(), &s.key, &s.sshd.known_hosts_line());
    eprintln!("authenticating with an {kind} key");
    let (c, a) = dial(&s.sshd, &opts, accept(&agent.listener)).await;
    contract::handshake_then_messages(Box::new(c), Box::new(a)).await;
}

#[tokio::test]
async fn ed25519_ecdsa_and_rsa_keys_authenticate() {
    authenticates_with("ed25519").await;
    authenticates_with("ecdsa").await;
    // OpenSSH 8.8+ refuses ssh-rsa (SHA-1) signatures: getting in proves rsa-sha2-256/512.
    authenticates_with("rsa").await;
}

#[tokio::test]
async fn an_encrypted_key_says_it_needs_its_passphrase_and_opens_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(&dir.path().join("id_locked"), "ed25519", "open sesame");
    let sshd = Sshd::start(dir.path(), "sshd", &[&key]);
    let agent = AgentSocket::bind(dir.path());
    let mut opts = options(dir.path(), agent.endpoint(), &key, &sshd.known_hosts_line());
    let e = open(&sshd, &opts).await.err().expect("no passphrase given");
    assert!(matches!(e, SshError::KeyNeedsPassphrase { .. }), "{e}");
    let message = e.to_string();
    assert!(
        message.contains(&key.display().to_string()) && message.contains("--identity-passphrase-file"),
        "{message}"
    );

    // A passphrase file others may read is refused before it is used, saying how to fix it.
    let open_file = dir.path().join("open");
    std::fs::write(&open_file, "open sesame\n").unwrap();
    std::fs::set_permissions(&open_file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    opts.passphrase_file = Some(open_file.clone());
    let e = open(&sshd, &opts).await.err().expect("a passphrase file others may read");
    assert!(matches!(e, SshError::PassphraseFileOpen { mode: 0o644, .. }), "{e}");
    assert!(e.to_string().contains(&format!("chmod 600 {}", open_file.display())), "{e}");

    let wrong = secret_file(&dir.path().join("wrong"), "open barley\n");
    opts.passphrase_file = Some(wrong.clone());
    let e = open(&sshd, &opts).await.err().expect("a wrong passphrase");
    assert!(matches!(e, SshError::WrongPassphrase { .. }), "{e}");
    assert!(e.to_string().contains(&wrong.display().to_string()), "{e}");

    let right = secret_file(&dir.path().join("right"), "open sesame\n");
    opts.passphrase_file = Some(right);
    open(&sshd, &opts).await.expect("the right passphrase opens the key");
}

#[tokio::test]
async fn a_refused_key_is_named_with_the_user_and_host() {
    let s = setup("ed25519");
    let stranger = keygen(&s.dir.path().join("id_stranger"), "ed25519", "");
    let agent = AgentSocket::bind(s.dir.path());
    let opts = options(s.dir.path(), agent.endpoint(), &stranger, &s.sshd.known_hosts_line());
    let e = open(&s.sshd, &opts).await.err().expect("a key sshd does not know");
    let message = e.to_string();
    assert!(matches!(e, SshError::AuthRefused { .. }), "{message}");
    assert!(message.contains(&stranger.display().to_string()), "{message}");
    assert!(message.contains(&format!("root@127.0.0.1:{}", s.sshd.port)), "{message}");
}

#[tokio::test]
async fn the_keys_of_a_running_ssh_agent_authenticate() {
    let s = setup("ed25519");
    let sock = s.dir.path().join("ssh-agent.sock");
    let mut ssh_agent = Command::new(need("ssh-agent"))
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .expect("starting ssh-agent");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "ssh-agent did not make its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    run(Command::new(need("ssh-add")).arg(&s.key).env("SSH_AUTH_SOCK", &sock));
    let agent = AgentSocket::bind(s.dir.path());
    let mut opts = options(s.dir.path(), agent.endpoint(), &s.key, &s.sshd.known_hosts_line());
    // No key file: only the agent holds the key.
    opts.identity = None;
    opts.agent_socket = Some(sock);
    let result = open(&s.sshd, &opts).await;
    let _ = ssh_agent.kill();
    let _ = ssh_agent.wait();
    result.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_host_behind_a_jump_host_is_reached_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(&dir.path().join("id_ed25519"), "ed25519", "");
    let bastion = Sshd::start(dir.path(), "bastion", &[&key]);
    let inner = Sshd::start(dir.path(), "inner", &[&key]);
    let agent = AgentSocket::bind(dir.path());
    let known = format!("{}{}", bastion.known_hosts_line(), inner.known_hosts_line());
    let mut opts = options(dir.path(), agent.endpoint(), &key, &known);
    opts.jump = Some(bastion.target());
    let (c, a) = dial(&inner, &opts, accept(&agent.listener)).await;
    contract::handshake_then_messages(Box::new(c), Box::new(a)).await;
    // A bastion that does not know us: the error says it was the jump host.
    opts.known_hosts = dir.path().join("only-inner");
    std::fs::write(&opts.known_hosts, inner.known_hosts_line()).unwrap();
    let e = open(&inner, &opts).await.err().expect("the bastion is unknown");
    assert!(matches!(&e, SshError::Jump { source, .. } if matches!(**source, SshError::UnknownHostKey { .. })), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_sshd_is_noticed_by_keepalive_and_the_host_is_reached_again_after_it_resumes() {
    let s = setup("ed25519");
    let agent = AgentSocket::bind(s.dir.path());
    let mut opts = options(s.dir.path(), agent.endpoint(), &s.key, &s.sshd.known_hosts_line());
    opts.keepalive_interval_ms = 300;
    opts.keepalive_max = 3;
    let (mut c, _a) = dial(&s.sshd, &opts, accept(&agent.listener)).await;
    s.sshd.signal_all(libc::SIGSTOP);
    // Nothing arrives and nothing can: the read ends once keepalives go unanswered.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(20), tokio::io::AsyncReadExt::read(&mut c, &mut buf))
        .await
        .expect("keepalive notices the stopped sshd well within 20 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    s.sshd.signal_all(libc::SIGCONT);
    // Reached again once sshd resumes.
    dial(&s.sshd, &opts, accept(&agent.listener)).await;
}
