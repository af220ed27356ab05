//! Event-time tumbling windows: the per-(token, window) aggregate and the keys of the items
//! it counts. Pure: no clock, no I/O; the engine decides when a window closes.

use std::net::IpAddr;

use rustc_hash::FxHashMap;

/// Most distinct items of one kind a window keeps; the rest only count as overflow.
pub const MAX_DISTINCT: usize = 64;

/// Start of the window holding `ts`.
#[inline]
pub fn window_start(ts: i64, size_ms: i64) -> i64 {
    // Never overflows, whatever the timestamp (the engine may be handed unvalidated data).
    ts.div_euclid(size_ms).saturating_mul(size_ms)
}

/// Status classes counted separately.
pub mod class {
    #![allow(missing_docs)]
    pub const OK: usize = 0;
    pub const AUTH: usize = 1;
    pub const LIMITED: usize = 2;
    pub const CLIENT: usize = 3;
    pub const SERVER: usize = 4;
}

/// Class of an HTTP status: 401/403, 429, other 4xx, 5xx, everything else.
#[inline]
pub fn status_class(s: u16) -> usize {
    match s {
        401 | 403 => class::AUTH,
        429 => class::LIMITED,
        400..=499 => class::CLIENT,
        500..=599 => class::SERVER,
        _ => class::OK,
    }
}

/// Word-at-a-time multiply-rotate hash of bytes: fixed here (not a library's choice that
/// may change) because snapshots store the keys it makes.
#[inline]
fn hash_bytes(b: &[u8], seed: u64) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = seed ^ (b.len() as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h ^ v).wrapping_mul(K).rotate_left(29);
    }
    let rem = chunks.remainder();
    if !rem.is_empty() {
        let mut buf = [0u8; 8];
        buf[..rem.len()].copy_from_slice(rem);
        h = (h ^ u64::from_le_bytes(buf))
            .wrapping_mul(K)
            .rotate_left(29);
    }
    h
}

/// Stable 64-bit key of text (never 0).
#[inline]
pub fn text_key(s: &str) -> u64 {
    crate::model::sketch::mix(hash_bytes(s.as_bytes(), 0x5EED)) | 1
}

/// Key of an endpoint: method and route template together.
#[inline]
pub fn endpoint_key(method: &str, endpoint: &str) -> u64 {
    let m = hash_bytes(method.as_bytes(), 0xE4D);
    crate::model::sketch::mix(hash_bytes(endpoint.as_bytes(), m)) | 1
}

/// Key of a country code (`DE` -> 0x4445).
#[inline]
pub fn country_key(c: &str) -> u64 {
    let b = c.as_bytes();
    if b.len() == 2 {
        ((b[0].to_ascii_uppercase() as u64) << 8) | b[1].to_ascii_uppercase() as u64
    } else {
        0
    }
}

/// Country code from its key.
pub fn country_name(k: u64) -> String {
    let a = ((k >> 8) & 0xff) as u8 as char;
    let b = (k & 0xff) as u8 as char;
    format!("{a}{b}")
}

/// Network prefix of an address: /24 for IPv4, /48 for IPv6.
#[inline]
pub fn prefix_key(ip: &IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => (4u64 << 56) | (u32::from(*v4) as u64 >> 8),
        IpAddr::V6(v6) => (6u64 << 56) | ((u128::from(*v6) >> 80) as u64),
    }
}

/// Printable prefix from its key.
pub fn prefix_name(k: u64) -> String {
    match k >> 56 {
        4 => {
            let v = ((k & 0xff_ffff) << 8) as u32;
            format!("{}/24", std::net::Ipv4Addr::from(v))
        }
        6 => {
            let v = ((k & 0xffff_ffff_ffff) as u128) << 80;
            format!("{}/48", std::net::Ipv6Addr::from(v))
        }
        _ => format!("prefix#{k:x}"),
    }
}

/// Distinct items of one kind in a window with their counts.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    /// (key, count), in order of first appearance.
    pub items: Vec<(u64, u32)>,
    /// Events whose item did not fit in `MAX_DISTINCT`.
    pub overflow: u32,
}

impl Counts {
    /// Count one more `key`; true when the key is new in this window.
    #[inline]
    pub fn add(&mut self, key: u64) -> bool {
        for it in self.items.iter_mut() {
            if it.0 == key {
                it.1 += 1;
                return false;
            }
        }
        if self.items.len() < MAX_DISTINCT {
            self.items.push((key, 1));
            true
        } else {
            self.overflow += 1;
            false
        }
    }

    /// Distinct items held.
    pub fn distinct(&self) -> usize {
        self.items.len()
    }

    fn clear(&mut self) {
        self.items.clear();
        self.overflow = 0;
    }
}

/// Everything one token did in one window.
#[derive(Debug, Clone, Default)]
pub struct WindowAgg {
    /// Window start, epoch ms.
    pub start: i64,
    /// Requests.
    pub count: u32,
    /// Requests per status class (see [`class`]).
    pub status: [u32; 5],
    /// Sum of bytes_out.
    pub bytes: u64,
    /// Largest bytes_out of one call.
    pub bytes_max: u64,
    /// Sum of latency of events that had one.
    pub latency_sum: f64,
    /// Events with a latency.
    pub latency_n: u32,
    /// Endpoints (method + route).
    pub endpoints: Counts,
    /// Countries.
    pub countries: Counts,
    /// Autonomous systems.
    pub asns: Counts,
    /// Network prefixes.
    pub prefixes: Counts,
    /// User agents.
    pub agents: Counts,
    /// Scopes the endpoints required.
    pub scopes: Counts,
    /// Environments that served the requests.
    pub envs: Counts,
    /// Events labelled 1 (evaluation only).
    pub labelled: u32,
    /// Anomaly kind of the labelled events (key into names), 0 if none.
    pub kind: u64,
    /// Earliest and latest event time in the window.
    pub first_ts: i64,
    /// Latest event time.
    pub last_ts: i64,
    /// Calls needing a scope the token's registry entry does not grant.
    pub out_of_scope: u32,
    /// ...of which the gateway answered with success (2xx/3xx): not refused.
    pub out_of_scope_ok: u32,
}

/// One event, borrowed from a columnar batch: what [`WindowAgg::observe`] needs.
#[derive(Debug, Clone, Copy)]
pub struct EventRef<'a> {
    /// Event time (epoch ms).
    pub ts: i64,
    /// HTTP method.
    pub method: &'a str,
    /// Route.
    pub endpoint: &'a str,
    /// Status code.
    pub status: u16,
    /// Response bytes.
    pub bytes: u64,
    /// Latency, if known.
    pub latency: Option<f32>,
    /// Source address as written.
    pub ip: &'a str,
    /// Country code.
    pub country: Option<&'a str>,
    /// Autonomous system.
    pub asn: Option<u32>,
    /// User agent.
    pub agent: Option<&'a str>,
    /// Scope the route needs.
    pub scope: Option<&'a str>,
    /// Environment that served it.
    pub env: Option<&'a str>,
    /// Labelled anomalous (evaluation only).
    pub label: bool,
    /// Anomaly kind of a labelled event.
    pub kind: Option<&'a str>,
}

impl WindowAgg {
    /// Reset for reuse, keeping allocations.
    pub fn reset(&mut self, start: i64) {
        self.start = start;
        self.count = 0;
        self.status = [0; 5];
        self.bytes = 0;
        self.bytes_max = 0;
        self.latency_sum = 0.0;
        self.latency_n = 0;
        for c in [
            &mut self.endpoints,
            &mut self.countries,
            &mut self.asns,
            &mut self.prefixes,
            &mut self.agents,
            &mut self.scopes,
            &mut self.envs,
        ] {
            c.clear();
        }
        self.labelled = 0;
        self.kind = 0;
        self.first_ts = i64::MAX;
        self.last_ts = i64::MIN;
        self.out_of_scope = 0;
        self.out_of_scope_ok = 0;
    }

    /// Fold one event in. `granted` holds the scope keys of the token's registry entry
    /// (empty: no scope facts). Names of new endpoints, agents, scopes, envs and kinds are
    /// noted for reasons. No allocation unless a name is new to the shard.
    #[inline]
    pub fn observe(&mut self, e: &EventRef, granted: &[u64], names: &mut Names) {
        self.count += 1;
        self.first_ts = self.first_ts.min(e.ts);
        self.last_ts = self.last_ts.max(e.ts);
        let cls = status_class(e.status);
        self.status[cls] += 1;
        self.bytes = self.bytes.saturating_add(e.bytes);
        self.bytes_max = self.bytes_max.max(e.bytes);
        if let Some(l) = e.latency {
            self.latency_sum += l as f64;
            self.latency_n += 1;
        }
        let k = endpoint_key(e.method, e.endpoint);
        if self.endpoints.add(k) {
            names.note(k, || format!("{} {}", e.method, e.endpoint));
        }
        if let Some(cc) = e.country {
            self.countries.add(country_key(cc));
        }
        if let Some(a) = e.asn {
            self.asns.add(a as u64);
        }
        if let Ok(ip) = e.ip.trim().parse::<IpAddr>() {
            self.prefixes.add(prefix_key(&ip));
        }
        if let Some(ua) = e.agent {
            let k = text_key(ua);
            if self.agents.add(k) {
                names.note(k, || ua.to_string());
            }
        }
        if let Some(s) = e.scope {
            let k = text_key(s);
            if self.scopes.add(k) {
                names.note(k, || s.to_string());
            }
            if !granted.is_empty() && !granted.contains(&k) {
                self.out_of_scope += 1;
                if e.status < 400 {
                    self.out_of_scope_ok += 1;
                }
            }
        }
        if let Some(s) = e.env {
            let k = text_key(s);
            if self.envs.add(k) {
                names.note(k, || s.to_string());
            }
        }
        if e.label {
            self.labelled += 1;
            if self.kind == 0 {
                if let Some(s) = e.kind {
                    let k = text_key(s);
                    self.kind = k;
                    names.note(k, || s.to_string());
                }
            }
        }
    }

    /// Write the aggregate (snapshot of an open window).
    pub fn encode(&self, w: &mut crate::model::codec::Writer) {
        w.i64(self.start);
        w.u32(self.count);
        for s in self.status {
            w.u32(s);
        }
        w.u64(self.bytes);
        w.u64(self.bytes_max);
        w.f64(self.latency_sum);
        w.u32(self.latency_n);
        for c in [
            &self.endpoints,
            &self.countries,
            &self.asns,
            &self.prefixes,
            &self.agents,
            &self.scopes,
            &self.envs,
        ] {
            w.u32(c.items.len() as u32);
            for &(k, n) in &c.items {
                w.u64(k);
                w.u32(n);
            }
            w.u32(c.overflow);
        }
        w.u32(self.labelled);
        w.u64(self.kind);
        w.i64(self.first_ts);
        w.i64(self.last_ts);
        w.u32(self.out_of_scope);
        w.u32(self.out_of_scope_ok);
    }

    /// Read what [`WindowAgg::encode`] wrote.
    pub fn decode(
        r: &mut crate::model::codec::Reader,
    ) -> Result<WindowAgg, crate::model::DecodeError> {
        let mut a = WindowAgg {
            start: r.i64()?,
            count: r.u32()?,
            ..Default::default()
        };
        for s in a.status.iter_mut() {
            *s = r.u32()?;
        }
        a.bytes = r.u64()?;
        a.bytes_max = r.u64()?;
        a.latency_sum = r.f64()?;
        a.latency_n = r.u32()?;
        for c in [
            &mut a.endpoints,
            &mut a.countries,
            &mut a.asns,
            &mut a.prefixes,
            &mut a.agents,
            &mut a.scopes,
            &mut a.envs,
        ] {
            let n = r.count(12)?;
            c.items.reserve(n);
            for _ in 0..n {
                let k = r.u64()?;
                c.items.push((k, r.u32()?));
            }
            c.overflow = r.u32()?;
        }
        a.labelled = r.u32()?;
        a.kind = r.u64()?;
        a.first_ts = r.i64()?;
        a.last_ts = r.i64()?;
        a.out_of_scope = r.u32()?;
        a.out_of_scope_ok = r.u32()?;
        Ok(a)
    }

    /// Mean latency in ms, if any event had one.
    pub fn mean_latency(&self) -> Option<f64> {
        (self.latency_n > 0).then(|| self.latency_sum / self.latency_n as f64)
    }
}

/// Printable names of keys, kept per shard for reasons ("first call to GET /v1/admin").
#[derive(Debug, Default)]
pub struct Names {
    map: FxHashMap<u64, Box<str>>,
}

impl Names {
    /// Most names kept per shard: a flood of distinct user agents or routes must not grow
    /// memory without bound. Past it, reasons show keys instead of names.
    pub const MAX: usize = 200_000;

    /// Remember `name` for `key` unless known (or the table is full).
    #[inline]
    pub fn note(&mut self, key: u64, name: impl FnOnce() -> String) {
        if self.map.len() >= Self::MAX {
            return;
        }
        self.map.entry(key).or_insert_with(|| {
            let mut s = name();
            if s.len() > 256 {
                // Keep reasons readable and bounded: cut at a character boundary.
                let mut cut = 256;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
            }
            s.into_boxed_str()
        });
    }

    /// Name of `key`, if noted.
    pub fn get(&self, key: u64) -> Option<&str> {
        self.map.get(&key).map(|s| &**s)
    }

    /// Name of a key whose 32 low bits are all a sketch kept.
    pub fn get_folded(&self, folded: u32) -> Option<&str> {
        self.map
            .iter()
            .find(|(k, _)| fold(**k) == folded)
            .map(|(_, v)| &**v)
    }

    /// All names (for merging shards).
    pub fn iter(&self) -> impl Iterator<Item = (&u64, &Box<str>)> {
        self.map.iter()
    }
}

/// Fold a 64-bit key to the 32 bits a sketch slot stores (never 0).
#[inline]
pub fn fold(k: u64) -> u32 {
    ((k ^ (k >> 32)) as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_align_to_epoch() {
        assert_eq!(window_start(125_000, 60_000), 120_000);
        assert_eq!(window_start(-1, 60_000), -60_000);
        assert_eq!(window_start(i64::MIN, 60_000), i64::MIN);
        assert_eq!(window_start(i64::MAX, 60_000) % 60_000, 0);
    }

    #[test]
    fn prefixes_group_neighbours() {
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let b: IpAddr = "203.0.113.200".parse().unwrap();
        let c: IpAddr = "203.0.114.7".parse().unwrap();
        assert_eq!(prefix_key(&a), prefix_key(&b));
        assert_ne!(prefix_key(&a), prefix_key(&c));
        assert_eq!(prefix_name(prefix_key(&a)), "203.0.113.0/24");
        let v6: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        assert_eq!(prefix_name(prefix_key(&v6)), "2001:db8:1::/48");
    }

    #[test]
    fn counts_cap_distinct() {
        let mut c = Counts::default();
        for i in 0..100 {
            c.add(i);
        }
        assert!(!c.add(1_000));
        assert_eq!(c.distinct(), MAX_DISTINCT);
        assert_eq!(c.overflow, 37);
        assert_eq!(status_class(403), class::AUTH);
        assert_eq!(country_name(country_key("de")), "DE");
    }
}
