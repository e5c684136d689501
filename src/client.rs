//! The HTTP client side of the CLI: finding the controller and its token,
//! calling the API, and turning its answers into clear errors.

use anyhow::{Context, anyhow, bail};
use cosmos_controller::http::ErrorBody;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::PathBuf;
use std::time::Duration;

/// Largest API answer read (a listing of very many jobs).
const RESPONSE_BYTES_MAX: u64 = 512 * 1024 * 1024;
/// Bound on asking one of several controllers whether it leads.
const LEADER_PROBE_S: u64 = 5;
/// Tries of one blob upload, each resuming where the last broke off.
const UPLOAD_TRIES: u32 = 10;
/// Wait before asking again after an incomplete or concurrent upload.
const UPLOAD_RETRY_MS: u64 = 500;
/// Bound on any one call, but log streams.
const CALL_TIMEOUT_S: u64 = 60;
/// Tries of one submission whose answer was lost or that met a busy controller.
const SUBMIT_TRIES: u32 = 5;
/// First wait between submission tries; it doubles each time.
const SUBMIT_RETRY_MS: u64 = 500;
/// Default bound on how long `jobs wait`, `--wait` and `jobs logs -f` keep
/// trying to reach a controller that went away (a restart loses nothing, so
/// they carry on once it is back), in seconds.
pub const RECONNECT_WAIT_S_DEFAULT: u64 = 120;
/// First pause between reconnection tries; it doubles up to the maximum.
const RECONNECT_BACKOFF_MS_MIN: u64 = 100;
/// Longest pause between reconnection tries.
const RECONNECT_BACKOFF_MS_MAX: u64 = 2_000;
/// Paths where the controller honours `Idempotency-Key`: a submission sent
/// again under its key is answered with what the first made, never run twice.
const IDEMPOTENT_POSTS: &[&str] = &["/v1/jobs", "/v1/runs"];

/// Where the controller is and how to authenticate.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Controller API URL, e.g. http://127.0.0.1:7700; several, comma-separated, for a leader and its standbys
    /// (the one leading is used).
    #[arg(long, env = "COSMOS_CONTROLLER", global = true)]
    pub controller: Option<String>,
    /// API token (else read from --data-dir).
    #[arg(long, env = "COSMOS_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// A local controller's data directory, to read its token (and find it on the default port).
    #[arg(long, env = "COSMOS_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// How long waiting and following commands keep retrying an unreachable controller, in seconds.
    #[arg(long, env = "COSMOS_RECONNECT_WAIT_S", global = true, default_value_t = RECONNECT_WAIT_S_DEFAULT)]
    pub reconnect_wait_s: u64,
}

/// Of several controllers (`--controller URL1,URL2`: a leader and its standbys
/// on one PostgreSQL store), the one that leads: the first that answers, or the
/// leader a standby names in its 503. None answering: the first, whose error then shows.
fn find_leader(agent: &ureq::Agent, list: &str, token: &str) -> String {
    let norm = |b: &str| {
        let b = b.trim().trim_end_matches('/');
        if b.contains("://") { b.to_string() } else { format!("http://{b}") }
    };
    let bases: Vec<String> = list.split(',').filter(|b| !b.trim().is_empty()).map(norm).collect();
    for base in &bases {
        let resp = agent
            .get(format!("{base}/v1/status"))
            .header("Authorization", format!("Bearer {token}"))
            .config()
            .timeout_global(Some(Duration::from_secs(LEADER_PROBE_S)))
            .build()
            .call();
        let Ok(mut resp) = resp else { continue };
        if resp.status().as_u16() != 503 {
            return base.clone();
        }
        let body: serde_json::Value = resp.body_mut().read_json().unwrap_or_default();
        if let Some(leader) = body.get("leader").and_then(|l| l.as_str()) {
            return norm(leader);
        }
    }
    bases.into_iter().next().unwrap_or_default()
}

/// A connected API client.
pub struct Client {
    /// The controller in use: the leader, when several were given.
    base: std::sync::RwLock<String>,
    /// Every controller given (`URL1,URL2`), to find the leader again when the one in use goes away.
    list: Option<String>,
    token: String,
    agent: ureq::Agent,
    reconnect_wait_s: u64,
}

impl Client {
    /// Resolves the controller URL and token: flags and environment first, then
    /// the data directory's token file, then the config file
    /// (`$XDG_CONFIG_HOME/cosmos/client.json`, else `~/.config/cosmos/client.json`,
    /// holding any of `controller`, `token`, `data_dir`).
    pub fn new(args: &ClientArgs) -> anyhow::Result<Client> {
        let file = ConfigFile::load()?;
        let base = args.controller.clone().or(file.controller).unwrap_or_else(|| "http://127.0.0.1:7700".to_string());
        let base = base.trim_end_matches('/').to_string();
        // `HOST:PORT` as the agents' --controller takes it means plain HTTP here too.
        let base = if base.contains("://") { base } else { format!("http://{base}") };
        let token = match (&args.token, args.data_dir.as_ref().or(file.data_dir.as_ref()), file.token) {
            (Some(t), _, _) => t.clone(),
            (None, Some(dir), _) => {
                let path = dir.join("api.token");
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!(
                            "cannot read the API token at {}: is this the controller's data directory?",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_string()
            }
            (None, None, Some(t)) => t,
            (None, None, None) => bail!(
                "no API token: pass --token or COSMOS_TOKEN, or --data-dir of a local controller, or put them in {}",
                ConfigFile::path().map_or("the config file".into(), |p| p.display().to_string())
            ),
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(CALL_TIMEOUT_S)))
            .build()
            .new_agent();
        let (base, list) =
            if base.contains(',') { (find_leader(&agent, &base, &token), Some(base)) } else { (base, None) };
        Ok(Client { base: std::sync::RwLock::new(base), list, token, agent, reconnect_wait_s: args.reconnect_wait_s })
    }

    /// The controller in use.
    fn base(&self) -> String {
        self.base.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// Of several controllers, asks again which leads (after the one in use
    /// went away or answered as a standby) and uses it from now on. With one
    /// controller it does nothing.
    fn follow_leader(&self) {
        let Some(list) = &self.list else { return };
        let leader = find_leader(&self.agent, list, &self.token);
        let mut base = self.base.write().unwrap_or_else(|p| p.into_inner());
        if *base != leader {
            eprintln!("following the leader to {leader}");
            *base = leader;
        }
    }

    fn check(
        &self,
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        let mut resp = resp.map_err(|e| Unreachable { base: self.base(), cause: e.to_string() })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(e) => Err(ApiError { body: e }.into()),
            Err(_) => bail!("controller answered {status}: {text}"),
        }
    }

    /// GET a JSON answer.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self.agent.get(self.url(path)).header("Authorization", format!("Bearer {}", self.token)).call();
        self.json(resp)
    }

    /// GET a JSON answer with the response headers named in `headers` (absent ones `None`).
    pub fn get_with<T: DeserializeOwned>(
        &self,
        path: &str,
        headers: &[&str],
    ) -> anyhow::Result<(T, Vec<Option<String>>)> {
        let resp = self.agent.get(self.url(path)).header("Authorization", format!("Bearer {}", self.token)).call();
        let mut resp = self.check(resp)?;
        let found =
            headers.iter().map(|h| resp.headers().get(*h).and_then(|v| v.to_str().ok()).map(str::to_string)).collect();
        let value = resp
            .body_mut()
            .with_config()
            .limit(RESPONSE_BYTES_MAX)
            .read_json::<T>()
            .context("the controller's answer is not the expected JSON")?;
        Ok((value, found))
    }

    /// Runs an operator command (`POST {object}/{verb}`), then prints the
    /// object it acted on (`--json`) or `said`: cancel and retry of jobs and runs.
    pub fn command<T: DeserializeOwned + Serialize>(
        &self,
        json: bool,
        object: &str,
        verb: &str,
        said: &str,
    ) -> anyhow::Result<()> {
        let _: serde_json::Value = self.post(&format!("{object}/{verb}"), &serde_json::json!({}))?;
        if json {
            let view: T = self.get(object)?;
            println!("{}", serde_json::to_string_pretty(&view)?);
        } else {
            println!("{said}");
        }
        Ok(())
    }

    /// POST JSON, read a JSON answer. A submission carries an idempotency key
    /// of its own and is sent again under it when its answer is lost or the
    /// controller is busy or restarting, so it is made once however often it is sent.
    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        let body = serde_json::to_vec(body).context("cannot encode the request")?;
        let send = |key: Option<&str>| {
            let mut req = self
                .agent
                .post(self.url(path))
                .header("Authorization", format!("Bearer {}", self.token))
                .header("Content-Type", "application/json");
            if let Some(key) = key {
                req = req.header("Idempotency-Key", key);
            }
            req.send(&body[..])
        };
        if !IDEMPOTENT_POSTS.contains(&path) {
            return self.json(send(None));
        }
        let key = idempotency_key()?;
        let mut wait_ms = SUBMIT_RETRY_MS;
        let started = std::time::Instant::now();
        let mut tries = 1;
        loop {
            // Of several controllers, one going away is a failover under way: the standby takes
            // over within a lease, so the submission waits for it (up to --reconnect-wait-s).
            let failing_over = self.list.is_some();
            let spent = if failing_over {
                started.elapsed() >= Duration::from_secs(self.reconnect_wait_s)
            } else {
                tries >= SUBMIT_TRIES
            };
            match send(Some(&key)) {
                Ok(r) if r.status().as_u16() != 503 => return self.json(Ok(r)),
                // Nothing listens there: trying again only delays the error.
                Err(e @ (ureq::Error::HostNotFound | ureq::Error::ConnectionFailed)) if !failing_over || spent => {
                    return self.json(Err(e));
                }
                Err(ureq::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::ConnectionRefused && (!failing_over || spent) =>
                {
                    return self.json(Err(ureq::Error::Io(e)));
                }
                other if spent => return self.json(other),
                Ok(_) | Err(_) => {
                    std::thread::sleep(Duration::from_millis(wait_ms));
                    wait_ms = if failing_over { (wait_ms * 2).min(RECONNECT_BACKOFF_MS_MAX) } else { wait_ms * 2 };
                    tries += 1;
                    self.follow_leader();
                }
            }
        }
    }

    fn json<T: DeserializeOwned>(
        &self,
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<T> {
        let mut resp = self.check(resp)?;
        resp.body_mut()
            .with_config()
            .limit(RESPONSE_BYTES_MAX)
            .read_json()
            .context("the controller's answer is not the expected JSON")
    }

    /// DELETE, read a JSON answer.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self.agent.delete(self.url(path)).header("Authorization", format!("Bearer {}", self.token)).call();
        self.json(resp)
    }

    /// What the controller holds of blob `sha256`.
    pub fn blob_state(&self, sha256: &str) -> anyhow::Result<BlobState> {
        let resp = self
            .agent
            .head(self.url(&format!("/v1/blobs/{sha256}")))
            .header("Authorization", format!("Bearer {}", self.token))
            .call()
            .map_err(|e| anyhow!("cannot reach the controller at {}: {e}", self.base()))?;
        let header = |name: &str| {
            resp.headers().get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        };
        match resp.status().as_u16() {
            200 => Ok(BlobState::Complete),
            404 => Ok(BlobState::Partial(header("x-cosmos-partial-bytes"))),
            s => bail!("controller answered {s} when asked for blob {sha256}"),
        }
    }

    /// Uploads a file as blob `sha256` unless the controller holds it, resuming
    /// where an earlier upload broke off, without the call timeout (videos are large).
    pub fn put_blob(&self, sha256: &str, file: &std::path::Path, size: u64) -> anyhow::Result<()> {
        use std::io::{Read, Seek};
        let mut last_error = None;
        for _ in 0..UPLOAD_TRIES {
            let offset = match self.blob_state(sha256)? {
                BlobState::Complete => return Ok(()),
                BlobState::Partial(have) if have <= size => have,
                BlobState::Partial(_) => 0,
            };
            let mut f = std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
            f.seek(std::io::SeekFrom::Start(offset)).with_context(|| format!("cannot read {}", file.display()))?;
            let resp = self
                .agent
                .put(self.url(&format!("/v1/blobs/{sha256}?offset={offset}&size={size}")))
                .header("Authorization", format!("Bearer {}", self.token))
                .header("Content-Type", "application/octet-stream")
                .header("Content-Length", (size - offset).to_string())
                .config()
                .timeout_global(None)
                .build()
                .send(ureq::SendBody::from_owned_reader(f.take(size - offset)));
            match resp {
                Ok(r) if r.status().as_u16() == 201 || r.status().as_u16() == 200 => return Ok(()),
                // Accepted but incomplete, or another upload of it in progress: ask again shortly.
                Ok(r) if r.status().as_u16() == 202 || r.status().as_u16() == 409 => {
                    std::thread::sleep(Duration::from_millis(UPLOAD_RETRY_MS));
                }
                Ok(r) => return self.check(Ok(r)).map(|_| ()),
                Err(e) => {
                    last_error = Some(e);
                    std::thread::sleep(Duration::from_millis(UPLOAD_RETRY_MS));
                }
            }
        }
        bail!(
            "uploading {} did not complete in {UPLOAD_TRIES} tries{}; run the command again to resume",
            file.display(),
            last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default()
        )
    }

    /// Downloads blob `sha256` into `dest` (through a temporary file, so a broken download leaves nothing behind).
    pub fn get_blob(&self, sha256: &str, dest: &std::path::Path) -> anyhow::Result<u64> {
        let resp = self
            .agent
            .get(self.url(&format!("/v1/blobs/{sha256}")))
            .header("Authorization", format!("Bearer {}", self.token))
            .config()
            .timeout_global(None)
            .build()
            .call();
        let resp = self.check(resp)?;
        let tmp = dest.with_extension("part");
        let mut out = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut body = resp.into_body().into_reader();
        let n = std::io::copy(&mut body, &mut out).with_context(|| format!("download of {sha256} broke off"))?;
        std::fs::rename(&tmp, dest).with_context(|| format!("cannot write {}", dest.display()))?;
        Ok(n)
    }

    /// [`Client::get`] through a controller restart: see [`Reconnect`].
    pub fn get_patiently<T: DeserializeOwned>(&self, path: &str, reconnect: &mut Reconnect) -> anyhow::Result<T> {
        loop {
            match self.get(path) {
                Ok(v) => {
                    reconnect.reached(self);
                    return Ok(v);
                }
                Err(e) => reconnect.failed(self, e)?,
            }
        }
    }

    /// A fresh reconnection budget for this client's waiting commands.
    pub fn reconnect(&self) -> Reconnect {
        Reconnect { since: None, backoff_ms: RECONNECT_BACKOFF_MS_MIN }
    }

    /// GET a stream (server-sent events), without the call timeout.
    pub fn stream(&self, path: &str) -> anyhow::Result<Box<dyn std::io::Read + Send>> {
        let resp = self
            .agent
            .get(self.url(path))
            .header("Authorization", format!("Bearer {}", self.token))
            .config()
            .timeout_global(None)
            .build()
            .call();
        Ok(Box::new(self.check(resp)?.into_body().into_reader()))
    }
}

/// The controller could not be reached (nothing listens, the connection broke, no answer).
#[derive(Debug)]
pub struct Unreachable {
    /// The controller's URL.
    pub base: String,
    /// What the transport said.
    pub cause: String,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot reach the controller at {}: {}; is it running? (--controller / COSMOS_CONTROLLER)",
            self.base, self.cause
        )
    }
}

impl std::error::Error for Unreachable {}

/// The error of a stream the controller ended without finishing it (it was stopping).
pub fn cut_stream() -> anyhow::Error {
    Unreachable { base: String::new(), cause: "the controller ended the stream early".into() }.into()
}

/// Whether `e` may clear once the controller is back: it was unreachable, or
/// answered that it is stopping or restarting (503, retryable).
pub fn is_transient(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Unreachable>().is_some()
        || e.downcast_ref::<ApiError>().is_some_and(|a| a.body.retryable)
        || e.downcast_ref::<std::io::Error>().is_some()
}

/// A waiting command's budget for a controller that went away: it retries
/// with backoff (saying so once) for up to `--reconnect-wait-s`, then fails.
pub struct Reconnect {
    /// When the controller was first found unreachable in this outage.
    since: Option<std::time::Instant>,
    backoff_ms: u64,
}

impl Reconnect {
    /// Records a failed call: sleeps before the next try when `e` may clear, else (or past the bound) returns the error.
    pub fn failed(&mut self, client: &Client, e: anyhow::Error) -> anyhow::Result<()> {
        if !is_transient(&e) {
            return Err(e);
        }
        let since = *self.since.get_or_insert_with(|| {
            eprintln!(
                "controller unreachable ({}); retrying for up to {} s",
                printable(&format!("{e:#}")),
                client.reconnect_wait_s
            );
            std::time::Instant::now()
        });
        if since.elapsed() >= Duration::from_secs(client.reconnect_wait_s) {
            bail!(
                "the controller at {} stayed unreachable for {} s ({e:#}); what it runs is unaffected: \
                 run the command again once it is back, or wait longer with --reconnect-wait-s",
                client.base(),
                client.reconnect_wait_s
            );
        }
        std::thread::sleep(Duration::from_millis(self.backoff_ms));
        self.backoff_ms = (self.backoff_ms * 2).min(RECONNECT_BACKOFF_MS_MAX);
        // Of several controllers, a standby may lead by now.
        client.follow_leader();
        Ok(())
    }

    /// Records a successful call: the outage, if any, is over.
    pub fn reached(&mut self, client: &Client) {
        if self.since.take().is_some() {
            eprintln!("controller at {} reachable again; carrying on", client.base());
        }
        self.backoff_ms = RECONNECT_BACKOFF_MS_MIN;
    }
}

/// `text` safe to print in a table or a terminal: control characters
/// (newlines, escape sequences, NUL) are shown escaped, as `\n` or `\u{1b}`.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect(),
    )
}

/// A fresh idempotency key: 128 random bits, hex.
fn idempotency_key() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("cannot read /dev/urandom for an idempotency key")?;
    Ok(format!("cli-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// What the controller holds of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobState {
    /// All of it, verified.
    Complete,
    /// This many bytes of an upload that broke off (0: nothing).
    Partial(u64),
}

/// The controller refused a request, with its reason.
#[derive(Debug)]
pub struct ApiError {
    /// The controller's explanation.
    pub body: ErrorBody,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.body.error)
    }
}

impl std::error::Error for ApiError {}

/// The client's optional config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    controller: Option<String>,
    token: Option<String>,
    data_dir: Option<PathBuf>,
}

impl ConfigFile {
    fn path() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        Some(base.join("cosmos").join("client.json"))
    }

    fn load() -> anyhow::Result<ConfigFile> {
        let Some(path) = ConfigFile::path() else { return Ok(ConfigFile::default()) };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str(&text).with_context(|| format!("{} is not a valid client config", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
}
