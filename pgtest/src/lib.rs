//! A throwaway PostgreSQL server for tests: `initdb` and `pg_ctl` from
//! Debian's `postgresql` package (installed by `scripts/setup`), its own data
//! directory in a temporary directory, listening on a free loopback port only,
//! stopped and removed when dropped.
//!
//! Starting a server is most of a short store test's time, so tests that need
//! only a database of their own take a [`Database`] on a server the tests of
//! one process share; a test that stops or restarts the server takes its own
//! [`Postgres`].
//!
//! `initdb` refuses to run as root, so under root the server runs as the
//! `postgres` user the Debian package creates. A missing PostgreSQL is a test
//! failure that says how to install it, never a skip.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// The database role and database every server here is created with.
pub const USER: &str = "cosmos";
/// How long `pg_ctl` waits for the server to accept connections.
pub const START_WAIT_S: u32 = 60;
/// Bind races (another process took the free port first) are retried this many times.
const START_TRIES_MAX: u32 = 3;

/// A running PostgreSQL server, stopped (immediately) when dropped.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// The user the server runs as when this process is root.
    run_as: Option<String>,
    running: bool,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").field("port", &self.port).field("data", &self.data_dir()).finish()
    }
}

/// Finds the server binaries: `$COSMOS_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`.
pub fn bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("COSMOS_PG_BIN") {
        let dir = PathBuf::from(dir);
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
        return Err(format!("COSMOS_PG_BIN={} holds no initdb; point it at PostgreSQL's bin directory", dir.display()));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        "PostgreSQL's server binaries (initdb, pg_ctl) are not installed under /usr/lib/postgresql/*/bin: \
         run scripts/setup, or apt-get install postgresql, or set COSMOS_PG_BIN"
            .to_string()
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

impl Postgres {
    /// Starts a fresh server, panicking with the fix when PostgreSQL is missing or will not start.
    pub fn start() -> Postgres {
        match Postgres::try_start() {
            Ok(pg) => pg,
            Err(e) => panic!("cannot start a test PostgreSQL: {e}"),
        }
    }

    /// Starts a fresh server: `initdb` into a new temporary directory, then `pg_ctl start`, waiting until it accepts connections.
    pub fn try_start() -> Result<Postgres, String> {
        let bin = bin_dir()?;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let dir =
            tempfile::Builder::new().prefix("cosmos-pg-").tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let run_as = if root {
            let (uid, gid) = user_ids("postgres").ok_or(
                "running as root, and initdb refuses root, but there is no `postgres` user to run the server as \
                 (Debian's postgresql package creates it; apt-get install postgresql)",
            )?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", dir.path().display()))?;
            Some("postgres".to_string())
        } else {
            None
        };
        let mut pg = Postgres { dir, bin, port: 0, run_as, running: false };
        let data = pg.data_dir();
        // trust: the server listens on loopback only, for this test alone.
        pg.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                USER.as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C.UTF-8".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        let mut last = String::new();
        for _ in 0..START_TRIES_MAX {
            pg.port = free_port();
            match pg.start_server() {
                Ok(()) => {
                    pg.running = true;
                    pg.run(
                        "createdb",
                        &[
                            "-h".as_ref(),
                            "127.0.0.1".as_ref(),
                            "-p".as_ref(),
                            pg.port.to_string().as_ref(),
                            "-U".as_ref(),
                            USER.as_ref(),
                            USER.as_ref(),
                        ],
                    )?;
                    return Ok(pg);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn start_server(&self) -> Result<(), String> {
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        // No Unix socket: the tests and controllers reach it over TCP, as they would a remote server.
        let opts = format!("-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories=", self.port);
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                opts.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                START_WAIT_S.to_string().as_ref(),
                "start".as_ref(),
            ],
        )
        .map_err(|e| format!("{e}\nserver log:\n{}", std::fs::read_to_string(&log).unwrap_or_default()))
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for the `cosmos` database, as `cosmos controller --store` takes it.
    pub fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{USER}", self.port)
    }

    /// Creates another empty database and returns its URL, for tests sharing one server.
    pub fn create_database(&self, name: &str) -> String {
        self.run(
            "createdb",
            &[
                "-h".as_ref(),
                "127.0.0.1".as_ref(),
                "-p".as_ref(),
                self.port.to_string().as_ref(),
                "-U".as_ref(),
                USER.as_ref(),
                name.as_ref(),
            ],
        )
        .unwrap_or_else(|e| panic!("createdb {name}: {e}"));
        format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs SQL through `psql` on the `cosmos` database, failing on the first error; returns what it printed.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in(USER, sql)
    }

    /// Runs SQL through `psql` on the named database, failing on the first error; returns what it printed.
    pub fn psql_in(&self, database: &str, sql: &str) -> String {
        let path = self.bin.join("psql");
        let out = Command::new(&path)
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                USER,
                "-d",
                database,
                "-p",
            ])
            .arg(self.port.to_string())
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the server now, as a crash would (`pg_ctl stop -m immediate`).
    pub fn stop(&mut self) {
        if self.running {
            let data = self.data_dir();
            let _ = self.run(
                "pg_ctl",
                &["-D".as_ref(), data.as_os_str(), "-m".as_ref(), "immediate".as_ref(), "-w".as_ref(), "stop".as_ref()],
            );
            self.running = false;
        }
    }

    /// Starts the stopped server again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.start_server().unwrap_or_else(|e| panic!("restarting the test PostgreSQL: {e}"));
        self.running = true;
    }

    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
        let path = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(&path);
                c
            }
            None => Command::new(&path),
        };
        cmd.args(args).stdin(Stdio::null());
        let out = cmd.output().map_err(|e| format!("running {}: {e}", path.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed ({}): {}{}",
                path.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server the tests of this process share while any of them holds a [`Database`] on it.
/// A `Weak`, not a `static` server: statics are never dropped, and a server nobody
/// stops would outlive the test process. The price is a fresh server when every
/// holder has let go between two tests.
static SHARED: Mutex<Weak<Postgres>> = Mutex::new(Weak::new());
/// Numbers the databases made on shared servers, so that no two tests of a process share one.
static DATABASES_MADE: AtomicU64 = AtomicU64::new(0);

/// An empty database of its own, on the server this process's tests share; the
/// server stops when the last `Database` on it is dropped.
pub struct Database {
    server: Arc<Postgres>,
    name: String,
    /// As `Postgres::create_database` made it: one place builds the URL.
    url: String,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database").field("name", &self.name).field("server", &self.server).finish()
    }
}

impl Database {
    /// Creates a fresh database, starting the shared server first if none runs, panicking with the fix when PostgreSQL is missing.
    pub fn create() -> Database {
        let server = {
            // A test that panicked while holding the lock left nothing half-done: the Weak is either set or not.
            let mut shared = SHARED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match shared.upgrade() {
                Some(server) => server,
                None => {
                    let server = Arc::new(Postgres::start());
                    *shared = Arc::downgrade(&server);
                    server
                }
            }
        };
        let name = format!("test_{}", DATABASES_MADE.fetch_add(1, Ordering::Relaxed));
        let url = server.create_database(&name);
        Database { server, name, url }
    }

    /// A connection URL for this database, as `cosmos controller --store` takes it.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Runs SQL through `psql` on this database, failing on the first error; returns what it printed.
    pub fn psql(&self, sql: &str) -> String {
        self.server.psql_in(&self.name, sql)
    }
}

fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string(Path::new("/etc/passwd")).ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.first() == Some(&name) && f.len() > 3).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}
