//! What happens after a score: alert policies (pure, [`policy`]), their actions (webhooks,
//! revocation, dead letters, the audit log, [`actions`]).

pub mod actions;
pub mod policy;
