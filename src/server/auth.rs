//! Who may call what: bearer keys per role, read from a keys file, compared in constant
//! time. Keys never reach a log line or an error message.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tonic::{Request, Status};

/// What a key may do. `Admin` may do everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Stream events in.
    Ingest,
    /// Read risk and alerts.
    Read,
    /// Everything, including retraining and snapshots.
    Admin,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s {
            "ingest" => Some(Role::Ingest),
            "read" => Some(Role::Read),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }
}

/// Shortest key accepted: anything shorter is guessable.
pub const MIN_KEY_LEN: usize = 16;

/// A keys-file problem. Says where, never what the key was.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A line that is not `ROLE KEY`.
    #[error("{path}: line {line}: {reason}")]
    Line {
        /// File.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// Why (without the key).
        reason: String,
    },
    /// The file can be read by others than its owner.
    #[error("{path}: the keys file is readable by other users (mode {mode:o}); chmod 600 it")]
    Readable {
        /// File.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// No key at all.
    #[error("{0}: no keys (lines `ROLE KEY` with ROLE ingest, read or admin)")]
    Empty(PathBuf),
}

/// The limits of one key, from the keys file (`ROLE KEY [name=NAME] [streams=N]
/// [events-per-sec=N]`).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyLimits {
    /// Ingest streams this key may hold open at once.
    pub streams: usize,
    /// Events per second this key may send (0: no limit beyond the server's).
    pub events_per_sec: f64,
}

/// Ingest streams one key may hold open at once unless its line says otherwise.
pub const DEFAULT_KEY_STREAMS: usize = 16;

/// Who is calling: the key's role, its name (for logs and metrics; never the key) and its
/// admission state (shared by every call with the same key).
#[derive(Debug)]
pub struct Caller {
    /// What the key may do.
    pub role: Role,
    /// The key's name (`name=` in the keys file, else `ROLE-LINE`).
    pub name: Arc<str>,
    /// Its limits.
    pub limits: KeyLimits,
    /// Its open ingest streams.
    pub streams: Arc<Semaphore>,
    /// Its event budget (token bucket), if it has one.
    pub bucket: Option<Mutex<Bucket>>,
}

/// A token bucket of events: `rate` per second, at most one second of them saved up.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64) -> Self {
        Bucket {
            rate,
            tokens: rate,
            at: Instant::now(),
        }
    }

    /// Take `n` events from the bucket; how long to wait before they may be applied.
    pub fn take(&mut self, n: f64) -> Duration {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate)
            .min(self.rate.max(1.0));
        self.at = now;
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

impl Caller {
    /// Wait until this key's event budget allows `n` more events (backpressure: the stream
    /// is not read meanwhile, and HTTP/2 flow control slows the client down).
    pub async fn admit(&self, n: usize) {
        let wait = match &self.bucket {
            Some(b) => b.lock().unwrap_or_else(|e| e.into_inner()).take(n as f64),
            None => Duration::ZERO,
        };
        if !wait.is_zero() {
            metrics::counter!("tokenwatch_ingest_throttled_total", "key" => self.name.to_string())
                .increment(1);
            tokio::time::sleep(wait).await;
        }
    }
}

/// The keys a server accepts.
#[derive(Clone)]
pub struct Keys {
    /// SHA-256 of each key with its caller: compared as digests, so neither the timing nor
    /// the length of a comparison says anything about a key.
    keys: Vec<([u8; 32], Arc<Caller>)>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys themselves are secrets: show only names and roles.
        let who: Vec<String> = self
            .keys
            .iter()
            .map(|(_, c)| format!("{} ({})", c.name, c.role.name()))
            .collect();
        f.debug_struct("Keys").field("keys", &who).finish()
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, key);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Keys {
    /// Read a keys file: one `ROLE KEY [name=NAME] [streams=N] [events-per-sec=N]` per
    /// line, `#` starts a comment. A file that others than its owner may read is refused
    /// (it holds secrets).
    pub fn load(path: &Path) -> Result<Keys, KeysError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|source| KeysError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let mode = meta.permissions().mode();
            if mode & 0o007 != 0 {
                return Err(KeysError::Readable {
                    path: path.to_path_buf(),
                    mode: mode & 0o777,
                });
            }
        }
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Keys::parse(&text, path)
    }

    /// Parse the text of a keys file (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Keys, KeysError> {
        let mut keys: Vec<([u8; 32], Arc<Caller>)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_err = |reason: &str| KeysError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                reason: reason.into(),
            };
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(role), Some(key)) = (parts.next(), parts.next()) else {
                return Err(line_err(
                    "expected `ROLE KEY [name=NAME] [streams=N] [events-per-sec=N]`",
                ));
            };
            let role = Role::parse(role).ok_or_else(|| {
                line_err(&format!(
                    "unknown role {role:?} (use ingest, read or admin)"
                ))
            })?;
            if key.len() < MIN_KEY_LEN {
                return Err(line_err(&format!(
                    "key is shorter than {MIN_KEY_LEN} characters"
                )));
            }
            let mut name = format!("{}-{}", role.name(), i + 1);
            let mut limits = KeyLimits {
                streams: DEFAULT_KEY_STREAMS,
                events_per_sec: 0.0,
            };
            for opt in parts {
                let Some((k, v)) = opt.split_once('=') else {
                    return Err(line_err(&format!("{opt:?} is not `OPTION=VALUE`")));
                };
                match k {
                    "name"
                        if !v.is_empty()
                            && v.len() <= 64
                            && v.chars().all(|c| c.is_ascii_graphic()) =>
                    {
                        name = v.to_string()
                    }
                    "name" => {
                        return Err(line_err("name must be 1..=64 printable ASCII characters"))
                    }
                    "streams" => {
                        limits.streams = v
                            .parse()
                            .ok()
                            .filter(|n| *n >= 1)
                            .ok_or_else(|| line_err("streams must be a whole number >= 1"))?
                    }
                    "events-per-sec" => {
                        limits.events_per_sec = v
                            .parse()
                            .ok()
                            .filter(|r: &f64| r.is_finite() && *r > 0.0)
                            .ok_or_else(|| line_err("events-per-sec must be a number > 0"))?
                    }
                    _ => {
                        return Err(line_err(&format!(
                            "unknown option {k:?} (name, streams, events-per-sec)"
                        )))
                    }
                }
            }
            let d = digest(key.as_bytes());
            if keys.iter().any(|(k, _)| bool::from(k.ct_eq(&d))) {
                return Err(line_err("the same key is given twice"));
            }
            if keys.iter().any(|(_, c)| *c.name == *name) {
                return Err(line_err(&format!("the name {name:?} is given twice")));
            }
            let caller = Caller {
                role,
                name: name.into(),
                streams: Arc::new(Semaphore::new(limits.streams)),
                bucket: (limits.events_per_sec > 0.0)
                    .then(|| Mutex::new(Bucket::new(limits.events_per_sec))),
                limits,
            };
            keys.push((d, Arc::new(caller)));
        }
        if keys.is_empty() {
            return Err(KeysError::Empty(path.to_path_buf()));
        }
        Ok(Keys { keys })
    }

    /// The caller of a presented key. Every key's digest is compared, in constant time,
    /// whatever matches, so timing tells nothing about which key came close.
    pub fn caller_of(&self, presented: &[u8]) -> Option<Arc<Caller>> {
        let d = digest(presented);
        let mut found = None;
        for (k, c) in &self.keys {
            if bool::from(k.ct_eq(&d)) {
                found = Some(c.clone());
            }
        }
        found
    }

    /// The role of a presented key.
    pub fn role_of(&self, presented: &[u8]) -> Option<Role> {
        self.caller_of(presented).map(|c| c.role)
    }
}

/// The key of an `authorization: Bearer KEY` header value (scheme in any case), if that is
/// what it is.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let (scheme, key) = header?.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// Failed authentications are logged at most once per this interval (with how many were
/// not logged); every one is counted in `tokenwatch_auth_failures_total`.
const AUTH_LOG_EVERY: Duration = Duration::from_secs(10);

/// Rate-limited logging of refused keys.
#[derive(Debug, Default)]
struct FailureLog {
    last: Option<Instant>,
    suppressed: u64,
}

static FAILURES: Mutex<FailureLog> = Mutex::new(FailureLog {
    last: None,
    suppressed: 0,
});

pub(crate) fn refused(why: &'static str) {
    metrics::counter!("tokenwatch_auth_failures_total", "reason" => why).increment(1);
    let mut f = FAILURES.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if f.last
        .is_some_and(|t| now.duration_since(t) < AUTH_LOG_EVERY)
    {
        f.suppressed += 1;
        return;
    }
    let suppressed = std::mem::take(&mut f.suppressed);
    f.last = Some(now);
    tracing::warn!(
        reason = why,
        suppressed,
        "request refused: authentication failed"
    );
}

/// The interceptor of every authenticated service: puts the caller's [`Role`] (and, with
/// keys, its [`Caller`]) into the request's extensions, or answers UNAUTHENTICATED.
/// `None` keys = `--insecure-no-auth`.
#[derive(Clone)]
pub struct Authenticate {
    /// Keys accepted; `None` lets everybody in as admin.
    pub keys: Option<std::sync::Arc<Keys>>,
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let role = match &self.keys {
            None => Role::Admin,
            Some(keys) => {
                let header = req
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok());
                let Some(presented) = bearer(header) else {
                    refused("no bearer key");
                    return Err(Status::unauthenticated(
                        "missing `authorization: Bearer <key>`",
                    ));
                };
                match keys.caller_of(presented.as_bytes()) {
                    Some(c) => {
                        let r = c.role;
                        req.extensions_mut().insert(c);
                        r
                    }
                    None => {
                        refused("unknown key");
                        return Err(Status::unauthenticated("unknown key"));
                    }
                }
            }
        };
        req.extensions_mut().insert(role);
        Ok(req)
    }
}

/// PERMISSION_DENIED unless the caller (authenticated by [`Authenticate`]) has `need`.
pub fn require<T>(req: &Request<T>, need: Role) -> Result<(), Status> {
    match req.extensions().get::<Role>() {
        Some(&r) if r == need || r == Role::Admin => Ok(()),
        Some(&r) => Err(Status::permission_denied(format!(
            "a `{}` key may not do this; it needs the `{}` role",
            r.name(),
            need.name()
        ))),
        // Not reachable through the service stack; refuse rather than trust.
        None => Err(Status::unauthenticated("not authenticated")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_roles_comments_and_refuses_bad_lines() {
        let p = Path::new("keys.txt");
        let k = Keys::parse(
            "# comment\ningest aaaaaaaaaaaaaaaa1\n\nread  bbbbbbbbbbbbbbbb2 # reader\nadmin cccccccccccccccc3\n",
            p,
        )
        .unwrap();
        assert_eq!(k.role_of(b"aaaaaaaaaaaaaaaa1"), Some(Role::Ingest));
        assert_eq!(k.role_of(b"bbbbbbbbbbbbbbbb2"), Some(Role::Read));
        assert_eq!(k.role_of(b"cccccccccccccccc3"), Some(Role::Admin));
        assert_eq!(k.role_of(b"cccccccccccccccc"), None);
        assert_eq!(k.role_of(b""), None);
        let e = Keys::parse("writer dddddddddddddddddd\n", p).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let e = Keys::parse("read short\n", p).unwrap_err().to_string();
        assert!(e.contains("shorter") && !e.contains("short\n"), "{e}");
        assert!(Keys::parse("# nothing\n", p).is_err());
        let e = Keys::parse("read eeeeeeeeeeeeeeeeee\nadmin eeeeeeeeeeeeeeeeee\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && !e.contains("eeee"), "{e}");
        assert!(!format!("{k:?}").contains("aaaa"));
    }

    #[test]
    fn per_key_names_and_limits() {
        let p = Path::new("keys.txt");
        let k = Keys::parse(
            "ingest aaaaaaaaaaaaaaaa1 name=gw-eu streams=2 events-per-sec=500\nread bbbbbbbbbbbbbbbb2\n",
            p,
        )
        .unwrap();
        let c = k.caller_of(b"aaaaaaaaaaaaaaaa1").unwrap();
        assert_eq!(&*c.name, "gw-eu");
        assert_eq!(
            c.limits,
            KeyLimits {
                streams: 2,
                events_per_sec: 500.0
            }
        );
        assert_eq!(c.streams.available_permits(), 2);
        let r = k.caller_of(b"bbbbbbbbbbbbbbbb2").unwrap();
        assert_eq!(
            (&*r.name, r.limits.streams),
            ("read-2", DEFAULT_KEY_STREAMS)
        );
        assert!(r.bucket.is_none());
        // A prefix or an extension of a key is not the key.
        assert!(k.caller_of(b"aaaaaaaaaaaaaaaa").is_none());
        assert!(k.caller_of(b"aaaaaaaaaaaaaaaa11").is_none());
        for bad in [
            "streams=0",
            "events-per-sec=-1",
            "colour=red",
            "name=",
            "oops",
        ] {
            let e = Keys::parse(&format!("ingest cccccccccccccccc3 {bad}\n"), p).unwrap_err();
            assert!(e.to_string().contains("line 1"), "{bad}: {e}");
        }
        let e = Keys::parse(
            "ingest dddddddddddddddd1 name=x\nread dddddddddddddddd2 name=x\n",
            p,
        );
        assert!(e.unwrap_err().to_string().contains("twice"));
        // A bucket of 500/s lets a second's worth through at once, then makes the rest wait.
        let mut b = Bucket::new(500.0);
        assert!(b.take(500.0).is_zero());
        assert!(b.take(250.0) >= Duration::from_millis(400));
    }

    #[cfg(unix)]
    #[test]
    fn a_world_readable_keys_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tw-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("keys");
        std::fs::write(&f, "read eeeeeeeeeeeeeeee1\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Keys::load(&f).unwrap_err().to_string();
        assert!(
            e.contains("readable by other users") && !e.contains("eeee"),
            "{e}"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Keys::load(&f).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
