//! A graceful stop: once SIGTERM or SIGINT arrives no new file is taken, and the batch in
//! flight has until `schedule.shutdown_timeout` to finish before it is rolled back.
//!
//! Batches check [`Shutdown::is_past_deadline`] between rows, so a batch is never cut off
//! inside a commit or a file move: it either reaches its commit or stops at a row boundary
//! and rolls back, leaving its file in `paths.incoming`.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A handle on the stop request, shared by everything that runs batches.
#[derive(Debug, Clone)]
pub struct Shutdown {
    requested: watch::Sender<bool>,
    deadline: Arc<OnceLock<Instant>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    /// A handle that no stop has been requested on yet.
    pub fn new() -> Shutdown {
        Shutdown {
            requested: watch::Sender::new(false),
            deadline: Arc::new(OnceLock::new()),
        }
    }

    /// Asks everything to stop; the batch in flight may run for `timeout` more.
    pub fn request(&self, timeout: Duration) {
        let _ = self.deadline.set(Instant::now() + timeout);
        self.requested.send_replace(true);
    }

    /// Whether a stop was requested: take no new file.
    pub fn is_requested(&self) -> bool {
        *self.requested.borrow()
    }

    /// Whether the batch in flight must give up now.
    pub fn is_past_deadline(&self) -> bool {
        self.deadline
            .get()
            .is_some_and(|deadline| Instant::now() >= *deadline)
    }

    /// Waits until a stop is requested.
    pub async fn requested(&self) {
        let mut receiver = self.requested.subscribe();
        let _ = receiver.wait_for(|requested| *requested).await;
    }

    /// Requests a stop when SIGTERM or SIGINT arrives, logging the signal.
    ///
    /// # Panics
    /// If the signal handlers cannot be installed.
    pub fn on_signals(&self, timeout: Duration) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).expect("a SIGTERM handler");
        let mut interrupt = signal(SignalKind::interrupt()).expect("a SIGINT handler");
        let shutdown = self.clone();
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            };
            let timeout_ms = timeout.as_millis() as u64;
            tracing::info!(signal = name, timeout_ms, "Stopping: no new file is taken.");
            shutdown.request(timeout);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_wakes_waiters_and_sets_the_deadline() {
        let shutdown = Shutdown::new();
        assert!(!shutdown.is_requested());
        let waiter = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.requested().await }
        });
        shutdown.request(Duration::ZERO);
        waiter.await.unwrap();
        assert!(shutdown.is_requested());
        assert!(shutdown.is_past_deadline());
    }
}
