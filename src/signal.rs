//! The signals a window can raise: a leaf module (no imports from the crate), so that the
//! configuration (weights per signal) and the models can both name them without depending
//! on each other.

/// Every signal a window can raise. The names are part of the output contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(missing_docs)]
pub enum SignalKind {
    Rate,
    Seasonal,
    NewCountry,
    NewAsn,
    NewPrefix,
    NewUserAgent,
    ConcurrentNetworks,
    NewEndpoint,
    EndpointRarity,
    AuthErrors,
    RateLimited,
    ServerErrors,
    ClientErrors,
    BytesOut,
    Latency,
    EndpointMix,
    PeerDistance,
    Isolation,
    ScopeViolation,
    EnvMismatch,
    TokenValidity,
}

impl SignalKind {
    /// All signals, in output column order.
    pub const ALL: [SignalKind; 21] = [
        SignalKind::Rate,
        SignalKind::Seasonal,
        SignalKind::NewCountry,
        SignalKind::NewAsn,
        SignalKind::NewPrefix,
        SignalKind::NewUserAgent,
        SignalKind::ConcurrentNetworks,
        SignalKind::NewEndpoint,
        SignalKind::EndpointRarity,
        SignalKind::AuthErrors,
        SignalKind::RateLimited,
        SignalKind::ServerErrors,
        SignalKind::ClientErrors,
        SignalKind::BytesOut,
        SignalKind::Latency,
        SignalKind::EndpointMix,
        SignalKind::PeerDistance,
        SignalKind::Isolation,
        SignalKind::ScopeViolation,
        SignalKind::EnvMismatch,
        SignalKind::TokenValidity,
    ];

    /// Stable snake_case name.
    pub fn name(self) -> &'static str {
        use SignalKind::*;
        match self {
            Rate => "rate",
            Seasonal => "seasonal",
            NewCountry => "new_country",
            NewAsn => "new_asn",
            NewPrefix => "new_prefix",
            NewUserAgent => "new_user_agent",
            ConcurrentNetworks => "concurrent_networks",
            NewEndpoint => "new_endpoint",
            EndpointRarity => "endpoint_rarity",
            AuthErrors => "auth_errors",
            RateLimited => "rate_limited",
            ServerErrors => "server_errors",
            ClientErrors => "client_errors",
            BytesOut => "bytes_out",
            Latency => "latency",
            EndpointMix => "endpoint_mix",
            PeerDistance => "peer_distance",
            Isolation => "isolation",
            ScopeViolation => "scope_violation",
            EnvMismatch => "env_mismatch",
            TokenValidity => "token_validity",
        }
    }

    /// The signal of a [`SignalKind::name`].
    pub fn from_name(name: &str) -> Option<SignalKind> {
        SignalKind::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Signals whose `p` is a likelihood ratio (how much less likely this is for the token
    /// than usual) rather than a tail probability: their evidence needs no quiet level.
    pub fn is_ratio(self) -> bool {
        matches!(self, SignalKind::Seasonal | SignalKind::EndpointRarity)
    }

    /// Statistical signals, whose evidence is calibrated to the token's own history of
    /// surprise (see `score::calibrate`); novelty and registry facts are not.
    pub fn is_calibrated(self) -> bool {
        use SignalKind::*;
        matches!(
            self,
            Rate | Seasonal
                | AuthErrors
                | RateLimited
                | ServerErrors
                | ClientErrors
                | BytesOut
                | Latency
                | EndpointMix
                | PeerDistance
                | Isolation
        )
    }

    /// Position in [`SignalKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}
