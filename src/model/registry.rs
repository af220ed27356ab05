//! Registry: facts about the token from the operator's registry (scopes, environment,
//! validity). An event needing a scope the token lacks, served by another environment, or
//! outside the token's validity is a policy violation; its tail probability is the
//! configured chance that the registry itself is wrong. Tokens absent from the registry get
//! no registry signal and every other one.

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
}

impl RegistryModel {
    /// From configuration.
    pub fn new(cfg: &Config) -> Self {
        RegistryModel {
            error_p: cfg.registry.error_p,
        }
    }
}

impl Model for RegistryModel {
    type State = ();

    fn score(&self, _: &(), w: &WindowAgg, ctx: &Ctx, out: &mut Scratch) {
        let Some(e) = ctx.registry else {
            return;
        };
        if !e.scope_keys.is_empty() {
            let mut bad = 0u32;
            let mut item = 0u64;
            for &(k, c) in &w.scopes.items {
                if !e.scope_keys.contains(&k) {
                    bad += c;
                    if item == 0 {
                        item = k;
                    }
                }
            }
            if bad > 0 {
                out.push(
                    Signal::new(SignalKind::ScopeViolation, bad as f64, 0.0, self.error_p)
                        .with_item(item),
                );
            }
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

    fn learn(&self, _: &mut (), _: &WindowAgg, _: &Ctx) {}

    fn encode(_: &(), _: &mut Writer) {}

    fn decode(_: &mut Reader) -> Result<(), DecodeError> {
        Ok(())
    }
}
