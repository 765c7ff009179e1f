//! The engine's error type: what a caller of [`crate::Engine`] can be told.

use thiserror::Error;

use crate::journal::JournalError;
use crate::sku::SkuError;
use crate::vault::VaultError;

#[derive(Debug, Error)]
pub enum EngineError {
    /// The state machine refused the command; see [`SkuError`].
    #[error(transparent)]
    Sku(#[from] SkuError),
    #[error("SKU not found")]
    SkuNotFound,
    #[error("SKU already exists")]
    SkuExists,
    /// A queue between the caller and the disk is full; retry after a short pause.
    #[error("overloaded: too many requests in flight, retry shortly")]
    Overloaded,
    /// The change could not be made durable, so it was not made.
    #[error("journal unavailable: {0}")]
    JournalUnavailable(String),
    /// The SKU's actor has stopped (after a storage failure it could not recover from).
    #[error("SKU is not serving")]
    SkuUnavailable,
    #[error("engine is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("invalid SKU bundle: {0}")]
    InvalidBundle(String),
    #[error(transparent)]
    Storage(#[from] JournalError),
    #[error("starting SKU actor: {0}")]
    Spawn(String),
}

impl EngineError {
    /// Whether the same request may succeed if retried later unchanged.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            EngineError::Overloaded
                | EngineError::JournalUnavailable(_)
                | EngineError::SkuUnavailable
                | EngineError::ShuttingDown
        )
    }

    pub(crate) fn from_journal(error: JournalError) -> Self {
        match error {
            JournalError::Closed => EngineError::ShuttingDown,
            other => EngineError::JournalUnavailable(other.to_string()),
        }
    }
}
