//! The web console (`serve --http ADDR`): pages for the people who answer the alerts, served
//! by the same process over the same engine, board and RPC handlers as gRPC (a verdict given
//! here goes through `SubmitFeedback`, the numbers come from `GetStats`, the least-privilege
//! page from `GetScopeUsage`'s report). Everything it needs is in the binary: HTML and SVG
//! are written on the server, no script, nothing fetched, so it works air-gapped.
//!
//! Access: a login form takes an API key (role `read` or `admin`) and sets an HttpOnly,
//! SameSite=Strict session cookie; scripts may send `Authorization: Bearer KEY` instead.
//! Every state-changing request is a POST that carries the session's CSRF token (bearer
//! callers need none: a browser never adds that header on its own). `read` may view, `admin`
//! may also give verdicts. No key or token secret is ever written into a page.
//!
//! Every page is also JSON (`Accept: application/json` or `?format=json`).

pub(crate) mod pages;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use rustc_hash::FxHashMap;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::auth::{Caller, Keys, Role};
use super::host::{Board, Cmd};
use super::pb;
use super::pb::token_watch_server::TokenWatch as _;
use super::service::Service;
use crate::config::ConsoleConfig;
use crate::model::registry::Registry;

/// Name of the session cookie.
const COOKIE: &str = "tw_session";
/// Rows of one page of a list.
const PAGE: usize = 50;
/// Filters of the risky-tokens list look at no more than this many of the riskiest tokens
/// (a bounded walk of the risk index, whatever the number of tokens tracked).
const FILTER_SCAN: usize = 100_000;
/// Of the audit log, only this much of its end is read for the alerts page.
pub(crate) const AUDIT_TAIL: u64 = 4 << 20;
/// Requests served at once; more wait (a slow page cannot be multiplied without bound).
const MAX_IN_FLIGHT: usize = 64;

/// What the console serves from.
pub struct Console {
    pub(super) svc: Arc<Service>,
    pub(super) board: Arc<Board>,
    pub(super) engine: mpsc::Sender<Cmd>,
    pub(super) keys: Option<Arc<Keys>>,
    pub(super) registry: Arc<Registry>,
    pub(super) cfg: ConsoleConfig,
    pub(super) data_dir: Option<std::path::PathBuf>,
    /// Cookies carry `Secure` (served over TLS).
    pub(super) tls: bool,
    /// Risk at which a window alerts.
    pub(super) alert_risk: f64,
    sessions: Mutex<Sessions>,
    /// The last (time, events) seen, for events/s.
    rate: Mutex<VecDeque<(Instant, u64)>>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// Who is asking.
#[derive(Clone)]
pub(crate) struct Who {
    role: Role,
    caller: Option<Arc<Caller>>,
    /// The session's CSRF token (`None`: a bearer caller, who needs none).
    csrf: Option<Arc<str>>,
    /// The key's name, shown in the header (never the key).
    name: Arc<str>,
}

impl Who {
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.extensions_mut().insert(self.role);
        if let Some(c) = &self.caller {
            r.extensions_mut().insert(c.clone());
        }
        r
    }

    fn admin(&self) -> bool {
        self.role == Role::Admin
    }
}

struct Session {
    who: Who,
    expires: Instant,
}

#[derive(Default)]
struct Sessions {
    by_id: FxHashMap<String, Session>,
    order: VecDeque<(Instant, String)>,
}

fn random_hex() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    // The system RNG does not fail on the platforms this builds for; a zero id would still
    // be refused below (length check) rather than shared.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Console {
    /// A console over the server's parts.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        svc: Arc<Service>,
        board: Arc<Board>,
        engine: mpsc::Sender<Cmd>,
        keys: Option<Arc<Keys>>,
        registry: Arc<Registry>,
        cfg: ConsoleConfig,
        data_dir: Option<std::path::PathBuf>,
        tls: bool,
        alert_risk: f64,
    ) -> Self {
        Console {
            svc,
            board,
            engine,
            keys,
            registry,
            cfg,
            data_dir,
            tls,
            alert_risk,
            sessions: Mutex::new(Sessions::default()),
            rate: Mutex::new(VecDeque::new()),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open a session for a caller; returns its id.
    fn open(&self, who: Who) -> String {
        let id = random_hex();
        let now = Instant::now();
        let ttl = Duration::from_millis(self.cfg.session_ttl.ms.max(1) as u64);
        let mut s = self.sessions();
        while s.by_id.len() >= self.cfg.max_sessions {
            match s.order.pop_front() {
                Some((_, old)) => {
                    s.by_id.remove(&old);
                }
                None => break,
            }
        }
        s.order.push_back((now, id.clone()));
        s.by_id.insert(
            id.clone(),
            Session {
                who,
                expires: now + ttl,
            },
        );
        id
    }

    fn close(&self, id: &str) {
        self.sessions().by_id.remove(id);
    }

    /// The caller of a request: its session cookie or its bearer key.
    fn who(&self, headers: &HeaderMap) -> Option<Who> {
        let Some(keys) = &self.keys else {
            // --insecure-no-auth: the console is as open as the API (the server warned).
            return Some(Who {
                role: Role::Admin,
                caller: None,
                csrf: session_id(headers).and_then(|id| {
                    self.sessions()
                        .by_id
                        .get(&id)
                        .and_then(|s| s.who.csrf.clone())
                }),
                name: "no authentication".into(),
            });
        };
        if let Some(key) = super::auth::bearer(
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
        ) {
            let Some(c) = keys.caller_of(key.as_bytes()) else {
                super::auth::refused("unknown key (console)");
                return None;
            };
            return Some(Who {
                role: c.role,
                name: c.name.clone(),
                caller: Some(c),
                csrf: None,
            });
        }
        let id = session_id(headers)?;
        let mut s = self.sessions();
        let now = Instant::now();
        match s.by_id.get(&id) {
            Some(sess) if sess.expires > now => Some(sess.who.clone()),
            Some(_) => {
                s.by_id.remove(&id);
                None
            }
            None => None,
        }
    }

    /// Events per second over the last minute of calls (at least two samples apart).
    fn events_per_sec(&self, events: u64) -> f64 {
        let mut r = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        r.push_back((now, events));
        while r.len() > 2 && now.duration_since(r[0].0) > Duration::from_secs(60) {
            r.pop_front();
        }
        let (t0, e0) = r[0];
        let dt = now.duration_since(t0).as_secs_f64();
        if dt < 0.5 {
            0.0
        } else {
            events.saturating_sub(e0) as f64 / dt
        }
    }

    async fn ask<T>(&self, cmd: Cmd, rx: oneshot::Receiver<T>) -> Result<T, Refused> {
        let gone = || {
            Box::new(fail(
                StatusCode::SERVICE_UNAVAILABLE,
                "the engine has stopped",
            ))
        };
        self.engine.send(cmd).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A request refused before its page is made (boxed: a response is large).
type Refused = Box<Response>;

/// The answer to a request that went wrong, as a small page (or JSON).
fn fail(code: StatusCode, why: &str) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{}: {why}\n", code.as_u16()),
    )
        .into_response()
}

/// Query parameters every page understands.
#[derive(Debug, Default, Deserialize)]
struct Common {
    format: Option<String>,
    offset: Option<usize>,
    signal: Option<String>,
    owner: Option<String>,
    env: Option<String>,
    token: Option<String>,
    window: Option<i64>,
    days: Option<u32>,
}

fn wants_json(headers: &HeaderMap, q: &Common) -> bool {
    if let Some(f) = &q.format {
        return f == "json";
    }
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"))
}

/// Security headers on every answer: no framing, no sniffing, no caching, nothing loaded
/// from anywhere but here, no script at all.
fn harden(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A page as HTML or JSON.
fn page<T: serde::Serialize>(json: bool, data: &T, html: impl FnOnce(&T) -> String) -> Response {
    if json {
        match serde_json::to_string(data) {
            Ok(s) => ([(header::CONTENT_TYPE, "application/json")], s).into_response(),
            Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    } else {
        (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html(data),
        )
            .into_response()
    }
}

/// Not logged in: the login page (HTML) or 401 (JSON).
fn login_first(json: bool) -> Response {
    if json {
        fail(
            StatusCode::UNAUTHORIZED,
            "log in at /login or send `Authorization: Bearer <key>`",
        )
    } else {
        Redirect::to("/login").into_response()
    }
}

/// A viewer: role read or admin.
fn viewer(c: &Console, headers: &HeaderMap, json: bool) -> Result<Who, Refused> {
    let who = c.who(headers).ok_or_else(|| Box::new(login_first(json)))?;
    if who.role == Role::Ingest {
        return Err(Box::new(fail(
            StatusCode::FORBIDDEN,
            "an `ingest` key may not use the console; it needs the `read` or `admin` role",
        )));
    }
    Ok(who)
}

/// A state change: the session's CSRF token must come with the form (bearer callers need
/// none), compared in constant time.
fn check_csrf(who: &Who, sent: &str) -> Result<(), Refused> {
    use subtle::ConstantTimeEq;
    match &who.csrf {
        None if who.caller.is_some() => Ok(()),
        Some(t) if bool::from(t.as_bytes().ct_eq(sent.as_bytes())) => Ok(()),
        _ => Err(Box::new(fail(
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token: reload the page and try again",
        ))),
    }
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        pages::css(),
    )
        .into_response()
}

async fn login_page(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    // Logged in already (a session, or a bearer key): nothing to do here. Without keys
    // everyone may view, but a form still needs the session's CSRF token: log in (any key).
    if c.who(&headers)
        .is_some_and(|w| w.role != Role::Ingest && (w.csrf.is_some() || w.caller.is_some()))
    {
        return Redirect::to("/").into_response();
    }
    page(false, &(), |_| pages::login(None))
}

#[derive(Deserialize)]
struct LoginForm {
    key: String,
}

/// The login's own cross-site check: a browser says where a form came from, in
/// `Sec-Fetch-Site` (modern browsers) or `Origin`; a login posted from another site is
/// refused (session cookies are SameSite=Strict too). Pages send no referrer, so a browser
/// may say `Origin: null` for a form of this very site: `Sec-Fetch-Site` decides then.
fn same_origin(headers: &HeaderMap) -> bool {
    let h = |n: &header::HeaderName| headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return site == "same-origin" || site == "none";
    }
    match h(&header::ORIGIN) {
        None | Some("null") => true,
        Some(origin) => {
            let host = h(&header::HOST).unwrap_or("");
            origin
                .split_once("://")
                .is_some_and(|(_, o)| o.eq_ignore_ascii_case(host))
        }
    }
}

async fn login(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if !same_origin(&headers) {
        return fail(
            StatusCode::FORBIDDEN,
            "a login from another site is refused",
        );
    }
    let caller = match &c.keys {
        None => None,
        Some(keys) => match keys.caller_of(f.key.trim().as_bytes()) {
            Some(k) => Some(k),
            None => {
                super::auth::refused("unknown key (console login)");
                // The same answer, and about the same time, whatever was wrong.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut r = page(false, &(), |_| pages::login(Some("That key is not valid.")));
                *r.status_mut() = StatusCode::UNAUTHORIZED;
                return r;
            }
        },
    };
    let role = caller.as_ref().map_or(Role::Admin, |k| k.role);
    if role == Role::Ingest {
        let mut r = page(false, &(), |_| {
            pages::login(Some(
                "An ingest key may not use the console: use a read or admin key.",
            ))
        });
        *r.status_mut() = StatusCode::FORBIDDEN;
        return r;
    }
    let who = Who {
        role,
        name: caller
            .as_ref()
            .map_or_else(|| "no authentication".into(), |k| k.name.clone()),
        caller,
        csrf: Some(random_hex().into()),
    };
    let id = c.open(who);
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        c.cfg.session_ttl.ms / 1000,
        if c.tls { "; Secure" } else { "" }
    );
    let mut r = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    let Some(who) = c.who(&headers) else {
        return Redirect::to("/login").into_response();
    };
    if let Err(r) = check_csrf(&who, &f.csrf) {
        return *r;
    }
    if let Some(id) = session_id(&headers) {
        c.close(&id);
    }
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("tw_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

async fn overview(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<Common>,
) -> Response {
    let json = wants_json(&headers, &q);
    let who = match viewer(&c, &headers, json) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let stats = match c.svc.get_stats(who.request(pb::GetStatsRequest {})).await {
        Ok(s) => s.into_inner(),
        Err(s) => return fail(StatusCode::SERVICE_UNAVAILABLE, s.message()),
    };
    let (tx, rx) = oneshot::channel();
    let open = match c
        .ask(
            Cmd::Alerts {
                offset: 0,
                limit: 0,
                token: None,
                reply: tx,
            },
            rx,
        )
        .await
    {
        Ok((_, _, open)) => open,
        Err(r) => return *r,
    };
    let hours = c.board.timelines().alert_hours();
    let data = pages::Overview::new(&stats, c.events_per_sec(stats.events), open, hours);
    page(json, &data, |d| pages::overview(&who, d))
}

async fn tokens(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<Common>,
) -> Response {
    let json = wants_json(&headers, &q);
    let who = match viewer(&c, &headers, json) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let nonempty = |s: &Option<String>| s.as_deref().filter(|s| !s.is_empty()).map(str::to_string);
    let (signal, owner, env) = (nonempty(&q.signal), nonempty(&q.owner), nonempty(&q.env));
    let reg = c.registry.clone();
    let keep = |r: &pb::TokenRisk| {
        if let Some(s) = &signal {
            if !r.contributions.iter().take(3).any(|c| &c.signal == s) {
                return false;
            }
        }
        if owner.is_none() && env.is_none() {
            return true;
        }
        let e = reg.get(&r.token_id);
        owner
            .as_ref()
            .is_none_or(|o| e.is_some_and(|e| &e.owner == o))
            && env
                .as_ref()
                .is_none_or(|v| e.and_then(|e| e.env.as_ref()) == Some(v))
    };
    let offset = q.offset.unwrap_or(0);
    let filtered = signal.is_some() || owner.is_some() || env.is_some();
    let rows = c.board.riskiest_where(
        keep,
        offset,
        PAGE,
        if filtered { FILTER_SCAN } else { usize::MAX },
    );
    let data = pages::Risky {
        tokens: rows
            .iter()
            .map(|r| pages::RiskyRow::new(r, c.registry.get(&r.token_id)))
            .collect(),
        offset,
        page: PAGE,
        signal,
        owner,
        env,
        filter_scan: filtered.then_some(FILTER_SCAN),
        tracked: c.board.len(),
    };
    page(json, &data, |d| pages::risky(&who, d))
}

async fn token(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(token_id): Path<String>,
    Query(q): Query<Common>,
) -> Response {
    let json = wants_json(&headers, &q);
    let who = match viewer(&c, &headers, json) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let latest = c
        .svc
        .get_token_risk(who.request(pb::GetTokenRiskRequest {
            token_id: token_id.clone(),
        }))
        .await
        .ok()
        .map(|r| r.into_inner());
    let agents = c.board.timelines().agents_of(&token_id);
    let keys = agents.iter().map(|a| a.0).collect();
    let (tx, rx) = oneshot::channel();
    let view = match c
        .ask(Cmd::Describe(token_id.as_str().into(), keys, tx), rx)
        .await
    {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let reg = c.registry.get(&token_id).cloned();
    if latest.is_none() && view.is_none() && reg.is_none() {
        return fail(
            StatusCode::NOT_FOUND,
            "no such token: not in the registry, not tracked, no scored window",
        );
    }
    let (tx, rx) = oneshot::channel();
    let alerts = match c
        .ask(
            Cmd::Alerts {
                offset: 0,
                limit: 20,
                token: Some(token_id.clone()),
                reply: tx,
            },
            rx,
        )
        .await
    {
        Ok((rows, _, _)) => rows,
        Err(r) => return *r,
    };
    // Scopes from the cached least-privilege report only: a token page never starts a read
    // of the whole history (the Scopes page and GetScopeUsage do, at most one at a time).
    let report = c.svc.scopes.peek();
    if report.is_none() && c.data_dir.is_some() {
        // None made yet: start one in the background for the next view.
        let (cache, days) = (c.svc.scopes.clone(), c.cfg.scope_days);
        tokio::spawn(async move {
            let _ = cache.get(days).await;
        });
    }
    let scopes = report.and_then(|r| r.tokens.iter().find(|t| t.token_id == token_id).cloned());
    let timeline = c.board.timelines().of(&token_id);
    let data = pages::TokenPage::new(
        token_id, latest, reg, view, timeline, q.window, alerts, scopes, agents,
    );
    page(json, &data, |d| pages::token(&who, d, c.alert_risk))
}

async fn alerts(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<Common>,
) -> Response {
    let json = wants_json(&headers, &q);
    let who = match viewer(&c, &headers, json) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let offset = q.offset.unwrap_or(0);
    let (tx, rx) = oneshot::channel();
    let (rows, total, open) = match c
        .ask(
            Cmd::Alerts {
                offset,
                limit: PAGE,
                token: q.token.clone().filter(|t| !t.is_empty()),
                reply: tx,
            },
            rx,
        )
        .await
    {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let ids: Vec<&str> = rows.iter().map(|r| r.alert_id.as_str()).collect();
    let audit = match &c.data_dir {
        Some(d) => {
            let path = d.join("audit.jsonl");
            let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
            match c.svc.cluster.get() {
                // Every node's audit log (each owner audits its own partitions' alerts).
                Some(q) => q.audit(&ids).await,
                None => {
                    tokio::task::spawn_blocking(move || pages::audit_of(&path, &ids, AUDIT_TAIL))
                        .await
                        .unwrap_or_default()
                }
            }
        }
        None => FxHashMap::default(),
    };
    let data = pages::Alerts::new(rows, total, open, offset, PAGE, audit);
    page(json, &data, |d| pages::alerts(&who, d))
}

#[derive(Deserialize)]
struct VerdictForm {
    #[serde(default)]
    csrf: String,
    verdict: String,
    #[serde(default)]
    note: String,
}

async fn verdict(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(alert_id): Path<String>,
    Query(q): Query<Common>,
    Form(f): Form<VerdictForm>,
) -> Response {
    let json = wants_json(&headers, &q);
    let Some(who) = c.who(&headers) else {
        return login_first(json);
    };
    if let Err(r) = check_csrf(&who, &f.csrf) {
        return *r;
    }
    if !who.admin() {
        return fail(
            StatusCode::FORBIDDEN,
            &format!(
                "a `{}` key may not give verdicts; it needs the `admin` role",
                who.role.name()
            ),
        );
    }
    let note = if f.note.is_empty() {
        format!("console ({})", who.name)
    } else {
        format!("console ({}): {}", who.name, f.note)
    };
    match c
        .svc
        .submit_feedback(who.request(pb::FeedbackRequest {
            alert_id: alert_id.clone(),
            verdict: f.verdict,
            note,
        }))
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            if json {
                let v = serde_json::json!({
                    "alert_id": alert_id,
                    "token_id": r.token_id,
                    "learned_windows": r.learned_windows,
                    "damped_signals": r.damped_signals,
                    "hold_until_ms": r.hold_until_ms,
                });
                ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
            } else {
                Redirect::to("/alerts").into_response()
            }
        }
        Err(s) => {
            let code = match s.code() {
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            fail(code, s.message())
        }
    }
}

async fn scopes(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<Common>,
) -> Response {
    let json = wants_json(&headers, &q);
    let who = match viewer(&c, &headers, json) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let offset = q.offset.unwrap_or(0);
    let days = q.days.unwrap_or(c.cfg.scope_days);
    match c
        .svc
        .get_scope_usage(who.request(pb::GetScopeUsageRequest {
            token_id: String::new(),
            days,
            limit: PAGE as u32,
            offset: offset as u32,
        }))
        .await
    {
        Ok(r) => {
            let data = pages::Scopes::new(r.into_inner(), offset, PAGE);
            page(json, &data, |d| pages::scopes(&who, d))
        }
        Err(s) => fail(StatusCode::SERVICE_UNAVAILABLE, s.message()),
    }
}

/// Bound the requests served at once.
async fn limit(
    State(c): State<Arc<Console>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Ok(_permit) = c.in_flight.clone().acquire_owned().await else {
        return fail(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    harden(next.run(req).await)
}

/// The console's routes.
pub(super) fn router(c: Arc<Console>) -> Router {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/", get(overview))
        .route("/tokens", get(tokens))
        .route("/tokens/{token_id}", get(token))
        .route("/alerts", get(alerts))
        .route("/alerts/{alert_id}/verdict", post(verdict))
        .route("/scopes", get(scopes))
        .route("/static/console.css", get(css))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 10))
        .layer(axum::middleware::from_fn_with_state(c.clone(), limit))
        .with_state(c)
}

fn tls_acceptor(cert: &[u8], key: &[u8]) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("console TLS certificate: {e}"))?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| format!("console TLS key: {e}"))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("console TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("console TLS: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Connections open at once; one more is closed at once (it would only wait).
const MAX_CONNECTIONS: usize = 1024;
/// How long in-flight requests may finish after the shutdown starts.
const DRAIN: Duration = Duration::from_secs(5);

/// Serve the console on `listener` until `shutdown` resolves. Each connection is served by
/// hyper with a header-read deadline (`console.header-timeout`: a client that opens a
/// connection and sends a request head slowly, or nothing, is cut off; `axum::serve` installs
/// no timer, so hyper's deadline would not apply there) and, with TLS, a handshake deadline.
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    console: Arc<Console>,
    tls: Option<(Vec<u8>, Vec<u8>)>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let header_timeout = Duration::from_millis(console.cfg.header_timeout.ms.max(1) as u64);
    let app = router(console);
    let acceptor = match tls {
        Some((c, k)) => Some(tls_acceptor(&c, &k)?),
        None => None,
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    // Out of descriptors, or a connection reset while queued: go on.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("tokenwatch_console_connections_refused_total").increment(1);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (app, acceptor) = (app.clone(), acceptor.clone());
        conns.spawn(async move {
            let _slot = slot;
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            match acceptor {
                None => {
                    let _ = http
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                }
                Some(a) => {
                    if let Ok(Ok(s)) = tokio::time::timeout(header_timeout, a.accept(tcp)).await {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                            .await;
                    }
                }
            }
        });
    }
    // Stop accepting; let the requests under way finish, briefly.
    let _ = tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
    conns.abort_all();
    Ok(())
}
