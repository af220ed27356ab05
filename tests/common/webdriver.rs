//! Drives headless Chromium through chromedriver's W3C WebDriver endpoints (JSON over HTTP).
//! The handful of commands a page test needs, over [`super::http`]: the WebDriver crates
//! (fantoccini, thirtyfour) would add an async HTTP client with a TLS stack to the build for
//! the same few calls.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::http::{request, try_request};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver and one browser session; both end on drop.
pub struct Browser {
    driver: Child,
    addr: String,
    session: String,
    _profile: tempfile::TempDir,
}

/// Where Debian puts them (`.ci/run` installs `chromium` and `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    /// Start chromedriver and a headless browser, or `None` when they are not installed.
    pub fn start() -> Option<Browser> {
        if !std::path::Path::new(CHROMEDRIVER).exists() || !std::path::Path::new(CHROMIUM).exists()
        {
            return None;
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let addr = format!("127.0.0.1:{port}");
        let t0 = Instant::now();
        loop {
            if try_request(&addr, "GET", "/status", &[], "").is_ok_and(|r| r.status == 200) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        // The flags this machine needs: no sandbox as root, and no background connections
        // (the network is closed; Chromium would retry them all the time).
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,1400",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        }}});
        let mut b = Browser {
            driver,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let v = b.call("POST", "/session", caps);
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Some(b)
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let text = if method == "GET" {
            String::new()
        } else {
            body.to_string()
        };
        let r = request(
            &self.addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            &text,
        );
        let v = r.json();
        assert!(
            r.status == 200,
            "WebDriver {method} {path}: {} {v}",
            r.status
        );
        v["value"].clone()
    }

    fn at(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Open a URL and wait for the page to load.
    pub fn goto(&self, url: &str) {
        self.call("POST", &self.at("/url"), json!({ "url": url }));
    }

    /// The current URL.
    pub fn url(&self) -> String {
        self.call("GET", &self.at("/url"), Value::Null)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Wait (up to 15 s) until the current URL satisfies `ok` (a click on a form button
    /// returns before the navigation it starts has finished); returns the URL.
    pub fn wait_url(&self, ok: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let u = self.url();
            if ok(&u) && self.ready() {
                return u;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "still at {u} after 15 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ready(&self) -> bool {
        self.call(
            "POST",
            &self.at("/execute/sync"),
            json!({"script": "return document.readyState", "args": []}),
        )
        .as_str()
            == Some("complete")
    }

    /// The page's HTML as the browser holds it.
    pub fn source(&self) -> String {
        self.call("GET", &self.at("/source"), Value::Null)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Elements matching a CSS selector.
    pub fn find_all(&self, css: &str) -> Vec<String> {
        self.call(
            "POST",
            &self.at("/elements"),
            json!({"using": "css selector", "value": css}),
        )
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e[ELEMENT].as_str().map(str::to_string))
        .collect()
    }

    /// The first element matching a CSS selector (panics, with the page, when none does).
    pub fn find(&self, css: &str) -> String {
        self.find_all(css)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no element {css} on {}:\n{}", self.url(), self.source()))
    }

    /// Type into an element.
    pub fn type_into(&self, el: &str, text: &str) {
        self.call(
            "POST",
            &self.at(&format!("/element/{el}/value")),
            json!({ "text": text }),
        );
    }

    /// Click an element (and wait for a navigation it starts).
    pub fn click(&self, el: &str) {
        self.call("POST", &self.at(&format!("/element/{el}/click")), json!({}));
    }

    /// An element's text.
    pub fn text(&self, el: &str) -> String {
        self.call("GET", &self.at(&format!("/element/{el}/text")), Value::Null)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// An element's attribute.
    pub fn attr(&self, el: &str, name: &str) -> Option<String> {
        self.call(
            "GET",
            &self.at(&format!("/element/{el}/attribute/{name}")),
            Value::Null,
        )
        .as_str()
        .map(str::to_string)
    }

    /// Delete the session's cookies (log out without the page).
    pub fn clear_cookies(&self) {
        self.call("DELETE", &self.at("/cookie"), Value::Null);
    }

    /// A PNG of the viewport, written to `path`.
    pub fn screenshot(&self, path: &std::path::Path) {
        let b64 = self.call("GET", &self.at("/screenshot"), Value::Null);
        let png = base64_decode(b64.as_str().unwrap_or_default());
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = request(&self.addr, "DELETE", &self.at(""), &[], "");
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
