//! Registry: facts about the token from the operator's registry (scopes, environment,
//! validity). An event needing a scope the token lacks, served by another environment, or
//! outside the token's validity is a policy violation; its tail probability is the
//! configured chance that the registry itself is wrong. Tokens absent from the registry get
//! no registry signal and every other one.
//!
//! Scope evidence is weighed by the token's own history: a window whose only out-of-scope
//! calls were refused (the gateway did its job) and touch a single scope is what a stale
//! client or a UI button does now and then. Such a window counts as much as it is rare for
//! this token (a Beta-Bernoulli rate of such windows), and these stray windows accumulate
//! with a half-life (`registry.stray-half-life`), so a few of them close together still
//! alert while one a day does not. Out-of-scope calls that succeeded, several scopes at
//! once or a burst (`registry.scope-burst` calls) are a violation at once.

use rustc_hash::FxHashMap;

use super::codec::{Reader, Writer};
use super::{Ctx, DecodeError, Model, Scratch, Signal, SignalKind};
use crate::config::Config;
use crate::window::{text_key, WindowAgg};

/// One registry row.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryEntry {
    /// Token id.
    pub token_id: String,
    /// Owner.
    pub owner: String,
    /// Role (informational: never used to score).
    pub role: String,
    /// Environment the token belongs to.
    pub env: Option<String>,
    /// Scopes granted.
    pub scopes: Vec<String>,
    scope_keys: Vec<u64>,
    env_key: u64,
    /// Valid from (epoch ms).
    pub created_at: Option<i64>,
    /// Valid until (epoch ms).
    pub expires_at: Option<i64>,
}

impl RegistryEntry {
    /// Keys of the granted scopes (empty: the registry says nothing about scopes).
    pub fn scope_keys(&self) -> &[u64] {
        &self.scope_keys
    }

    /// Build an entry; empty strings mean "unknown".
    pub fn new<'a>(
        token_id: &str,
        owner: &str,
        role: &str,
        env: &str,
        scopes: impl Iterator<Item = &'a str>,
        created_at: Option<i64>,
        expires_at: Option<i64>,
    ) -> Self {
        let scopes: Vec<String> = scopes.map(str::to_string).collect();
        let env = (!env.is_empty()).then(|| env.to_string());
        RegistryEntry {
            token_id: token_id.into(),
            owner: owner.into(),
            role: role.into(),
            scope_keys: scopes.iter().map(|s| text_key(s)).collect(),
            env_key: env.as_deref().map_or(0, text_key),
            env,
            scopes,
            created_at,
            expires_at,
        }
    }
}

/// All registry rows by token id.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: FxHashMap<String, std::sync::Arc<RegistryEntry>>,
}

impl Registry {
    /// Add or replace a row.
    pub fn insert(&mut self, e: RegistryEntry) {
        self.entries
            .insert(e.token_id.clone(), std::sync::Arc::new(e));
    }

    /// Row of a token.
    pub fn get(&self, token: &str) -> Option<&RegistryEntry> {
        self.entries.get(token).map(|e| &**e)
    }

    /// Row of a token, shared (held by the token's slot so scoring needs no lookup).
    pub fn get_shared(&self, token: &str) -> Option<std::sync::Arc<RegistryEntry>> {
        self.entries.get(token).cloned()
    }

    /// Every row (in no particular order).
    pub fn iter(&self) -> impl Iterator<Item = &RegistryEntry> {
        self.entries.values().map(|e| &**e)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Registry parameters.
#[derive(Debug, Clone)]
pub struct RegistryModel {
    error_p: f64,
    burst: u32,
    stray_half_life_ms: f64,
}

/// What the token's history says about its out-of-scope calls.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RegistryState {
    /// Learned windows whose only out-of-scope calls were refused, on one scope.
    pub stray: u32,
    /// Accumulated evidence (nats) of recent stray windows, decaying.
    pub acc: f32,
    /// Minute (since the epoch) `acc` was last updated.
    pub acc_at: u32,
}

/// The out-of-scope calls of a window.
struct OutOfScope {
    calls: u32,
    scopes: u32,
    item: u64,
    ok: u32,
}

impl RegistryModel {
    /// From configuration.
    pub fn new(cfg: &Config) -> Self {
        RegistryModel {
            error_p: cfg.registry.error_p,
            burst: cfg.registry.scope_burst,
            stray_half_life_ms: cfg.registry.stray_half_life.ms.max(1) as f64,
        }
    }

    fn out_of_scope(e: &RegistryEntry, w: &WindowAgg) -> Option<OutOfScope> {
        // `WindowAgg::observe` counted them against the same registry entry.
        if e.scope_keys.is_empty() || w.out_of_scope == 0 {
            return None;
        }
        let mut o = OutOfScope {
            calls: 0,
            scopes: 0,
            item: 0,
            ok: w.out_of_scope_ok,
        };
        for &(k, c) in &w.scopes.items {
            if !e.scope_keys.contains(&k) {
                o.calls += c;
                o.scopes += 1;
                if o.item == 0 {
                    o.item = k;
                }
            }
        }
        (o.calls > 0).then_some(o)
    }

    /// A window of out-of-scope calls that is a violation at once (not a stray refusal).
    fn strong(&self, o: &OutOfScope) -> bool {
        o.ok > 0 || o.scopes >= 2 || o.calls >= self.burst
    }

    /// Surprise (nats) of one stray window for this token.
    fn stray_surprise(st: &RegistryState, windows: u32) -> f64 {
        let p = (st.stray as f64 + 0.5) / (windows as f64 + 2.5);
        -p.ln()
    }

    /// Accumulated stray evidence as of minute `now`.
    fn decayed(&self, st: &RegistryState, now: u32) -> f64 {
        let dt = now.saturating_sub(st.acc_at) as f64 * 60_000.0;
        st.acc as f64 * 0.5f64.powf(dt / self.stray_half_life_ms)
    }

    /// Follow a window whether or not it is learned: stray windows accumulate.
    pub fn track(&self, st: &mut RegistryState, w: &WindowAgg, ctx: &Ctx) {
        let Some(o) = ctx.registry.and_then(|e| Self::out_of_scope(e, w)) else {
            return;
        };
        if self.strong(&o) {
            return;
        }
        let now = minute(ctx.start);
        let acc = self.decayed(st, now) + Self::stray_surprise(st, ctx.windows);
        st.acc = acc.min(1e4) as f32;
        st.acc_at = now;
    }
}

fn minute(ms: i64) -> u32 {
    ms.div_euclid(60_000).clamp(0, u32::MAX as i64) as u32
}

impl Model for RegistryModel {
    type State = RegistryState;

    fn score(&self, st: &RegistryState, w: &WindowAgg, ctx: &Ctx, out: &mut Scratch) {
        let Some(e) = ctx.registry else {
            return;
        };
        if let Some(o) = Self::out_of_scope(e, w) {
            let p = if self.strong(&o) {
                self.error_p
            } else {
                let acc =
                    self.decayed(st, minute(ctx.start)) + Self::stray_surprise(st, ctx.windows);
                (-acc).exp().max(self.error_p)
            };
            // `expected`: the token's share of windows with stray refusals.
            let share = (st.stray as f64 + 0.5) / (ctx.windows as f64 + 2.5);
            out.push(
                Signal::new(SignalKind::ScopeViolation, o.calls as f64, share, p).with_item(o.item),
            );
        }
        if e.env_key != 0 {
            let mut bad = 0u32;
            let mut item = 0u64;
            for &(k, c) in &w.envs.items {
                if k != e.env_key {
                    bad += c;
                    if item == 0 {
                        item = k;
                    }
                }
            }
            if bad > 0 {
                out.push(
                    Signal::new(SignalKind::EnvMismatch, bad as f64, 0.0, self.error_p)
                        .with_item(item),
                );
            }
        }
        if let Some(c) = e.created_at {
            if w.first_ts < c {
                out.push(Signal::new(
                    SignalKind::TokenValidity,
                    w.first_ts as f64,
                    c as f64,
                    self.error_p,
                ));
                return;
            }
        }
        if let Some(x) = e.expires_at {
            if w.last_ts > x {
                out.push(Signal::new(
                    SignalKind::TokenValidity,
                    w.last_ts as f64,
                    x as f64,
                    self.error_p,
                ));
            }
        }
    }

    fn learn(&self, st: &mut RegistryState, w: &WindowAgg, ctx: &Ctx) {
        if let Some(o) = ctx.registry.and_then(|e| Self::out_of_scope(e, w)) {
            if !self.strong(&o) {
                st.stray = st.stray.saturating_add(1);
            }
        }
    }

    fn encode(st: &RegistryState, w: &mut Writer) {
        w.u32(st.stray);
        w.f32(st.acc);
        w.u32(st.acc_at);
    }

    fn decode(r: &mut Reader) -> Result<RegistryState, DecodeError> {
        Ok(RegistryState {
            stray: r.u32()?,
            acc: r.f32()?,
            acc_at: r.u32()?,
        })
    }
}
